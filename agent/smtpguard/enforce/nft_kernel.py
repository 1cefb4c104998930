"""What the kernel's nf_tables holds and can do, apart from applying: a
libnftables context, a scratch namespace for probes and dry runs, which
families can reject, our tables' rules and device chains counted over
netlink (listing a table would fetch every set element), removal, and the
devices a netdev chain can hook now."""

from __future__ import annotations

import ctypes
import json
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from smtpguard.enforce import render
from smtpguard.enforce.desired import Capabilities, Desired
from smtpguard.errors import BackendUnavailable, EnforcerError

T = TypeVar("T")
CLONE_NEWNET = 0x40000000


def nft() -> Any:
    try:
        import nftables
    except ImportError as exc:
        raise BackendUnavailable("python3-nftables is not importable (make setup)") from exc
    try:
        n = nftables.Nftables()
    except OSError as exc:  # libnftables itself missing
        raise BackendUnavailable(f"libnftables cannot be loaded: {exc}") from exc
    n.set_json_output(True)
    n.set_handle_output(False)
    return n


def in_scratch_netns(fn: Callable[[], T]) -> T:
    """Run fn in a thread of its own inside a fresh, empty network namespace
    (gone when the thread ends): for probing and dry runs."""
    box: dict[str, T] = {}
    err: list[BaseException] = []

    def target() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        try:
            if libc.unshare(CLONE_NEWNET) != 0:
                raise EnforcerError(f"unshare(CLONE_NEWNET): errno {ctypes.get_errno()}")
            box["r"] = fn()
        except BaseException as exc:  # handed back to the caller
            err.append(exc)

    t = threading.Thread(target=target, name="nft-scratch")
    t.start()
    t.join()
    if err:
        raise err[0]
    return box["r"]


def remove_tables(n: Any = None) -> bool:
    """Delete our tables (bridge and inet `smtpguard`), creating nothing and
    touching no other table. True if there was anything."""
    n = n or nft()
    existed = False
    for fam in render.FAMILIES:
        # Deleted without listing it first: a listing fetches every element
        # of the dedup sets (seconds once they are full).
        rc, _out, err = n.json_cmd({"nftables": [
            {"delete": {"table": {"family": fam, "name": render.TABLE}}}]})
        if rc == 0:
            existed = True
        elif "No such file or directory" not in err:
            raise EnforcerError(f"deleting table {fam} {render.TABLE}: {err.strip() or rc}")
    return existed


def probe() -> Capabilities:
    """Which families can reject (TCP reset) where we hook on this kernel:
    bridge and inet prerouting, a device's netdev ingress."""
    def run() -> Capabilities:
        n = nft()
        ok = {}
        for fam in render.FAMILIES:
            hook = "ingress device lo" if fam == "netdev" else "prerouting"
            rc, _, _ = n.cmd(f"add table {fam} p; add chain {fam} p c {{ type filter hook "
                             f"{hook} priority -300; }}; add rule {fam} p c meta l4proto "
                             "tcp reject with tcp reset")
            ok[fam] = rc == 0
        return Capabilities(reject_bridge=ok["bridge"], reject_inet=ok["inet"],
                            reject_netdev=ok["netdev"])

    return in_scratch_netns(run)


def parse_table(out: str) -> dict[str, Any]:
    """A `list table` (JSON) as sets, chains, named counters and a rule count."""
    result: dict[str, Any] = {"sets": {}, "chains": set(), "counters": {}, "rules": 0,
                              "limits": set()}
    for obj in json.loads(out)["nftables"]:
        if "limit" in obj:
            result["limits"].add(obj["limit"]["name"])
        for kind in ("set", "map"):
            if kind in obj:
                result["sets"][obj[kind]["name"]] = obj[kind]
        if "chain" in obj:
            result["chains"].add(obj["chain"]["name"])
        if "counter" in obj:
            result["counters"][obj["counter"]["name"]] = obj["counter"]
        if "rule" in obj:
            result["rules"] += 1
    return result


NFPROTO = {1: "inet", 5: "netdev", 7: "bridge"}


def rule_counts() -> dict[str, int]:
    """family -> rules in our table, over netlink: a dump of rules only, which
    stays milliseconds whatever the sets hold. A family without our table is
    absent."""
    from pyroute2.nftables.main import NFTables

    nft = NFTables(nfgen_family=0)  # every family
    try:
        out = {NFPROTO[c["nfgen_family"]]: 0 for c in nft.get_chains()
               if c.get_attr("NFTA_CHAIN_TABLE") == render.TABLE
               and c["nfgen_family"] in NFPROTO}
        for r in nft.get_rules():
            fam = NFPROTO.get(r["nfgen_family"])
            if fam in out and r.get_attr("NFTA_RULE_TABLE") == render.TABLE:
                out[fam] += 1
    finally:
        nft.close()
    return out


def device_chains() -> set[str]:
    """The netdev table's device chains in the kernel now (a chain dump over
    netlink: listing the table would fetch every set element)."""
    from pyroute2.nftables.main import NFTables

    nft = NFTables(nfgen_family=5)
    try:
        return {c.get_attr("NFTA_CHAIN_NAME") for c in nft.get_chains()
                if c.get_attr("NFTA_CHAIN_TABLE") == render.TABLE
                and render.is_device_chain(c.get_attr("NFTA_CHAIN_NAME") or "")}
    finally:
        nft.close()


def present(desired: Desired) -> Desired:
    """desired with netdev hooks only on devices that exist now: a 6.1
    kernel refuses to hook a missing device (the whole transaction fails),
    and drops a device's base chain when the device goes."""
    if not desired.hooks:
        return desired
    from dataclasses import replace

    from smtpguard.datapath import linkdump

    names = {link.name for link in linkdump.dump()}
    hooks = {n: h for n, h in desired.hooks.items() if n in names}
    return desired if len(hooks) == len(desired.hooks) else replace(desired, hooks=hooks)
