"""The iptables backend's per-VM state: which interfaces are blocked or
throttled, and until when, held in kernel ipsets (pyroute2's ipset netlink).

The rules are fixed (iptables_render writes them once per VM chain); what a
block, throttle or release changes is only elements of these sets, so it
never replaces the table. One `hash:net,iface` set per state and family; an
interface is in it twice, as `0.0.0.0/0,IF` for routed taps and as
`0.0.0.0/0,physdev:IF` for bridged VMs. Which of the two a packet meets is
up to the rule, not the element: xt_set looks a packet up by its bridge port
only when the match carries IPSET_FLAG_PHYSDEV (no iptables option sets it;
iptc_table.by_bridge_port does), otherwise by its input interface, which for
a bridged VM is the bridge. So every state rule comes twice, one of each.
Tested with real packets: with the input-interface lookup alone, a bridged
VM's block let its SYNs through.

A timed action is an element timeout (the kernel stops matching it on time,
with no agent running) and carries its end in the element's comment, so a
restart adopts the exact second.
"""

from __future__ import annotations

import math
import socket
import time
from collections.abc import Iterable, Mapping
from typing import Any

from smtpguard.enforce.desired import Action
from smtpguard.errors import EnforcerError

Family = str  # "ipv4" | "ipv6" (iptables_render.Family)
KINDS = ("block", "throttle")
BASE = {"block": "SMTPG-BLOCK", "throttle": "SMTPG-THROTTLE"}
AF = {"ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}
ANY = {"ipv4": "0.0.0.0/0", "ipv6": "::/0"}
MAXELEM = 65536
FLAG_PHYSDEV = 1 << 1  # IPSET_FLAG_PHYSDEV
ENOENT = 2

State = dict[str, tuple[str, int | None]]  # ifname -> (kind, until)


def set_name(kind: str, family: Family) -> str:
    return f"{BASE[kind]}{4 if family == 'ipv4' else 6}"


def all_names() -> list[str]:
    return [set_name(k, f) for k in KINDS for f in AF]


def until_of(action: Action) -> int | None:
    """Whole seconds, rounded up: an action never ends early."""
    return None if action.until is None else math.ceil(action.until)


class IpsetState:
    """Our sets in this thread's network namespace (one netlink socket per
    call: the lab runs agents in threads of different namespaces)."""

    def _open(self) -> Any:
        try:
            from pyroute2.ipset import IPSet
        except ImportError as exc:  # pragma: no cover - pyroute2 is a dependency
            raise EnforcerError(f"pyroute2's ipset support is missing: {exc}") from exc
        try:
            return IPSet()
        except Exception as exc:  # noqa: BLE001 - netlink refuses without ip_set
            raise EnforcerError(f"opening the kernel's ipset netlink: {exc}") from exc

    def ensure(self) -> None:
        """Create our sets where missing (the rules refer to them)."""
        with self._session() as s:
            for kind in KINDS:
                for fam, af in AF.items():
                    try:
                        s.create(set_name(kind, fam), stype="hash:net,iface", family=af,
                                 exclusive=False, timeout=0, comment=True, maxelem=MAXELEM)
                    except Exception as exc:  # noqa: BLE001
                        raise EnforcerError(f"creating ipset {set_name(kind, fam)}: {exc}"
                                            ) from exc

    def read(self) -> dict[Family, dict[str, list[tuple[str, int | None, bool]]]]:
        """family -> ifname -> [(kind, until, physdev)] of unexpired elements;
        {} for a family whose sets are missing."""
        out: dict[Family, dict[str, list[tuple[str, int | None, bool]]]] = {}
        now = time.time()
        with self._session() as s:
            for fam in AF:
                got: dict[str, list[tuple[str, int | None, bool]]] = {}
                for kind in KINDS:
                    try:
                        msgs = list(s.list(set_name(kind, fam)))
                    except Exception:  # noqa: BLE001 - gone: the caller repairs
                        msgs = []
                    for m in msgs:
                        adt = m.get_attr("IPSET_ATTR_ADT")
                        for e in adt.get_attrs("IPSET_ATTR_DATA") if adt else ():
                            ifname = e.get_attr("IPSET_ATTR_IFACE")
                            comment = e.get_attr("IPSET_ATTR_COMMENT") or ""
                            until = int(comment) if comment.isdigit() else None
                            if not ifname or (until is not None and until <= now):
                                continue
                            physdev = bool((e.get_attr("IPSET_ATTR_CADT_FLAGS") or 0)
                                           & FLAG_PHYSDEV)
                            got.setdefault(ifname, []).append((kind, until, physdev))
                out[fam] = got
        return out

    @staticmethod
    def state(read: Mapping[Family, Mapping[str, list[tuple[str, int | None, bool]]]]
              ) -> tuple[State, set[str]]:
        """What is in force (any element of an interface says so; a block wins
        over a throttle) and the interfaces whose four elements disagree."""
        out: State = {}
        seen: dict[str, set[tuple[str, str, int | None, bool]]] = {}
        for fam, ifaces in read.items():
            for ifname, elems in ifaces.items():
                for kind, until, physdev in elems:
                    seen.setdefault(ifname, set()).add((fam, kind, until, physdev))
                    if ifname not in out or (kind == "block" and out[ifname][0] != "block"):
                        out[ifname] = (kind, until)
        odd = {n for n, e in seen.items()
               if e != {(f, *out[n], p) for f in AF for p in (False, True)}}
        return out, odd

    def write(self, want: Mapping[str, tuple[str, int | None]], names: Iterable[str],
              have: Mapping[str, tuple[str, int | None]] | None = None) -> None:
        """Bring these interfaces' elements to `want` (both families, plain
        and physdev). `have`: what the sets hold, when just read; without it
        every other state's elements are deleted (deleting what is gone is
        fine), so an element added behind our back goes too."""
        now = time.time()
        with self._session() as s:
            for ifname in names:
                new = want.get(ifname)
                if new is not None and new[1] is not None and new[1] <= now:
                    new = None  # over: nothing to hold
                old = None if have is None else have.get(ifname)
                if have is not None and old == new:
                    continue
                for fam in AF:
                    for kind in KINDS:
                        if (new is None or new[0] != kind) and (
                                have is None or (old is not None and old[0] == kind)):
                            self._delete(s, kind, fam, ifname)
                    if new is not None:
                        self._add(s, new[0], fam, ifname, new[1], now)

    def _add(self, s: Any, kind: str, fam: Family, ifname: str, until: int | None,
             now: float) -> None:
        timeout = 0 if until is None else max(1, math.ceil(until - now))
        for physdev in (False, True):
            try:  # not exclusive: an element already there takes the new end
                s.add(set_name(kind, fam), (ANY[fam], ifname), family=AF[fam],
                      etype="net,iface", exclusive=False, timeout=timeout,
                      comment="" if until is None else str(until), physdev=physdev)
            except Exception as exc:  # noqa: BLE001
                raise EnforcerError(f"adding {ifname} to ipset {set_name(kind, fam)}: {exc}"
                                    ) from exc

    def _delete(self, s: Any, kind: str, fam: Family, ifname: str) -> None:
        from pyroute2.netlink.nfnetlink.ipset import IPSET_CMD_DEL

        for physdev in (False, True):
            try:  # pyroute2's delete() has no physdev flag: its own request, with it
                s._run_with_cleanup(s.asyncore._add_delete_test, set_name(kind, fam),
                                    (ANY[fam], ifname), AF[fam], IPSET_CMD_DEL, False,
                                    etype="net,iface", physdev=physdev)
            except Exception as exc:  # noqa: BLE001
                if getattr(exc, "code", None) in (ENOENT, 4103, 4104):
                    continue  # not there (IPSET_ERR_EXIST and kin): deleted is deleted
                raise EnforcerError(f"deleting {ifname} from ipset {set_name(kind, fam)}: "
                                    f"{exc}") from exc

    def destroy(self) -> bool:
        """Destroy our sets (after the rules that use them). True if any was."""
        gone = False
        with self._session() as s:
            for name in all_names():
                try:
                    s.destroy(name)
                    gone = True
                except Exception:  # noqa: BLE001 - not there
                    continue
        return gone

    def _session(self) -> Any:
        return _Session(self._open())


class _Session:
    def __init__(self, s: Any) -> None:
        self.s = s

    def __enter__(self) -> Any:
        return self.s

    def __exit__(self, *exc: object) -> None:
        self.s.close()
