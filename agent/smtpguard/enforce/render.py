"""Render the desired state into nftables JSON commands (libnftables' JSON API):
the commands that bring each family's table to its chains (nft_chains.py,
which also says where they hook and why) and its sets and maps (nft_sets.py),
keeping what it can. The face of both: callers take every name from here."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from smtpguard.enforce.desired import Capabilities, Desired
from smtpguard.enforce.nft_chains import (
    EGRESS,
    FAMILIES,
    IIF,
    OIF,
    PRIORITY,
    REASONS,
    RETURN,
    TABLE,
    chains,
    class_chain,
    device_chains,
    entry,
    iface_wildcards,
    nft_limit,
    port25_blocked,
    redirecting,
    throttle_chain,
)
from smtpguard.enforce.nft_sets import (
    CLASS_SETS,
    DATA_SETS,
    LIMITER_IDLE,
    SEEN_FOR,
    SIZES,
    STATE_MAPS,
    TYPEOF_SETS,
    elements,
    same_set,
    sets,
    shared_limits,
    state_elements,
)

__all__ = [
    "BASE_CHAINS", "CLASS_SETS", "DATA_SETS", "EGRESS", "FAMILIES", "IIF", "LIMITER_IDLE", "OIF",
    "PRIORITY", "REASONS", "RETURN", "SEEN_FOR", "SIZES", "STATE_MAPS", "TABLE", "TYPEOF_SETS",
    "chain_spec", "chains", "class_chain", "device_chains", "device_commands", "element_commands",
    "elements", "iface_wildcards", "is_device_chain", "nft_limit", "port25_blocked",
    "redirecting", "same_set", "sets", "shared_limits", "state_elements", "table_commands",
    "throttle_chain",
]

BASE_CHAINS = {"prerouting": ("filter", PRIORITY), "nat_prerouting": ("nat", -100)}


def _obj(family: str, **body: Any) -> dict[str, Any]:
    return {"family": family, "table": TABLE, **body}


def element_commands(family: str, desired: Desired, names: Iterable[str],
                     now: float | None = None) -> list[dict[str, Any]]:
    """Replace the elements of data sets: flush, then add (one transaction)."""
    elems = elements(desired, now)
    have = sets(desired, family)
    cmds: list[dict[str, Any]] = []
    if {"vm_lim", "vm_thr"} & set(names):
        # `add` keeps an object that exists (and its bucket).
        cmds += [{"add": {"limit": _obj(family, name=n, **body)}}
                 for n, body in sorted(shared_limits(desired).items())]
    for name in names:
        if name not in have:
            continue  # vm_redirect without a redirecting class
        cmds.append({"flush": {"set" if "map" not in have[name] else "map":
                               _obj(family, name=name)}})
        if elems[name]:
            cmds.append({"add": {"element": _obj(family, name=name, elem=elems[name])}})
    return cmds


def table_commands(family: str, desired: Desired, caps: Capabilities,
                   observed: dict[str, Any] | None, now: float | None = None
                   ) -> list[dict[str, Any]]:
    """Bring one family's table to the desired state, keeping what it can:
    the limiter, seen and counter sets survive (their state and counters),
    rules and data elements are replaced, anything else of ours is pruned."""
    observed = observed or {"sets": {}, "chains": set()}
    wanted_chains = chains(desired, family, caps)
    wanted_sets = sets(desired, family)
    cmds: list[dict[str, Any]] = [{"add": {"table": {"family": family, "name": TABLE}}}]
    for name in observed["chains"]:
        cmds.append({"flush": {"chain": _obj(family, name=name)}})
    for name, body in wanted_sets.items():
        have = observed["sets"].get(name)
        kind = "map" if "map" in body else "set"
        if have is not None and same_set(have, body):
            continue  # kept with its elements (re-adding would clash on flags)
        if have is not None:
            cmds.append({"delete": {kind: _obj(family, name=name)}})
        cmds.append({"add": {kind: _obj(family, name=name, **body)}})
    devices = device_chains(desired) if family == "netdev" else {}
    for name in wanted_chains:
        cmds.append({"add": {"chain": chain_spec(family, name, devices)}})
    for name in sorted(observed["chains"] - set(wanted_chains)):
        cmds.append({"delete": {"chain": _obj(family, name=name)}})
    for name, have in sorted(observed["sets"].items()):
        if name not in wanted_sets and name not in TYPEOF_SETS:
            kind = "map" if "map" in have else "set"
            cmds.append({"delete": {kind: _obj(family, name=name)}})
    cmds += element_commands(family, desired, DATA_SETS, now)
    wanted_limits = shared_limits(desired)
    for name in sorted(observed.get("limits", set()) - set(wanted_limits)):
        cmds.append({"delete": {"limit": _obj(family, name=name)}})  # no element refers to it
    for name, rules in wanted_chains.items():
        for expr in rules:
            cmds.append({"add": {"rule": _obj(family, chain=name, expr=expr)}})
    return cmds


def chain_spec(family: str, name: str, devices: Mapping[str, tuple[str, str]]
               ) -> dict[str, Any]:
    """A chain's JSON body: a base chain's hook, device and priority too."""
    chain: dict[str, Any] = _obj(family, name=name)
    if family != "netdev" and name in BASE_CHAINS:
        kind, prio = BASE_CHAINS[name]
        chain.update(type=kind, hook="prerouting", prio=prio, policy="accept")
    elif name in devices:
        hook, dev = devices[name]
        chain.update(type="filter", hook=hook, dev=dev, prio=PRIORITY, policy="accept")
    return chain


def device_commands(desired: Desired, have: Iterable[str]) -> list[dict[str, Any]]:
    """Bring the netdev table's device chains to desired.hooks: those gone
    deleted (have: the device chains there now), each wanted one made (or
    kept) with its one rule."""
    wanted = device_chains(desired)
    cmds: list[dict[str, Any]] = [
        {"delete": {"chain": _obj("netdev", name=n)}} for n in sorted(set(have) - set(wanted))]
    for name, (hook, _dev) in wanted.items():
        cmds.append({"add": {"chain": chain_spec("netdev", name, wanted)}})
        cmds.append({"flush": {"chain": _obj("netdev", name=name)}})
        for expr in entry("smtp" if hook == "ingress" else f"{EGRESS}smtp"):
            cmds.append({"add": {"rule": _obj("netdev", chain=name, expr=expr)}})
    return cmds


def is_device_chain(name: str) -> bool:
    return name.startswith(("in_", "out_"))
