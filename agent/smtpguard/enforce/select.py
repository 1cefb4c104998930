"""Which enforcement backend runs: nftables where it can, iptables-legacy
where the host already runs it.

`auto` never creates iptables-legacy tables on a host that does not have
them: a legacy table, once created, hooks every packet of its namespace
until reboot (measured: 11% of bridged small-packet throughput here). So
`auto` takes nftables when it works, and falls back to iptables only on a
specific "nftables is not available" error *and* when this namespace already
holds legacy tables. `--backend iptables` (or the policy's
`enforcement.backend: iptables`) is the operator's explicit choice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from smtpguard import logs
from smtpguard.enforce.keeper import Enforcer
from smtpguard.errors import BackendUnavailable, EnforcerError

Choice = Literal["auto", "nftables", "iptables"]
CHOICES: tuple[Choice, ...] = ("auto", "nftables", "iptables")


def choose(requested: Choice, nftables: Callable[[], Enforcer],
           iptables: Callable[[], Enforcer], legacy_in_use: Callable[[], bool]) -> Enforcer:
    """The backend to run (constructed); raises EnforcerError with the reason."""
    log = logs.get()
    if requested == "nftables":
        return nftables()
    if requested == "iptables":
        enf = iptables()
        if not legacy_in_use():
            log.warning("enforce.legacy_tables_created", backend="iptables",
                        hint="this namespace had no iptables-legacy tables; on a host "
                        "managed with nftables, prefer --backend nftables")
        return enf
    try:
        return nftables()
    except BackendUnavailable as exc:
        if not legacy_in_use():
            raise EnforcerError(
                f"nftables is not available ({exc}) and this host has no iptables-legacy "
                "tables to fall back on without creating them; install nftables, or pass "
                "--backend iptables if this host is managed with iptables-legacy") from exc
        log.warning("enforce.backend_fallback", backend="iptables", reason=str(exc))
        return iptables()


def remove_other(running: str, remove: Callable[[], bool]) -> bool:
    """Remove the other backend's smtpguard objects, in the same start: one
    left from an earlier run with the other backend would keep rejecting (and
    counting) the SMTP SYNs first, so the running backend never sees them and
    its release releases nothing. Only our own objects go; nothing is created
    (no legacy table where none exists). Logged as one event when there was
    anything; an error is logged and the start goes on."""
    other = "iptables" if running == "nftables" else "nftables"
    try:
        removed = remove()
    except (BackendUnavailable, EnforcerError) as exc:
        logs.get().warning("enforce.other_backend_kept", backend=running, other=other,
                           error=str(exc), hint="smtpguard --cleanup removes both")
        return False
    if removed:
        logs.get().warning("enforce.other_backend_removed", backend=running, other=other)
    return removed


def remove_other_real(running: str) -> bool:
    """remove_other() with the real backends."""
    from smtpguard.enforce.iptables import IptablesEnforcer, legacy_tables_in_use
    from smtpguard.enforce.nftables import remove_tables

    if running == "nftables":
        # Without legacy tables there is nothing of ours (and python-iptables
        # need not even be installed).
        return remove_other(running, lambda: legacy_tables_in_use() and
                            IptablesEnforcer().remove())
    if running == "iptables":
        return remove_other(running, remove_tables)
    return False


def construct(requested: Choice) -> Enforcer:
    """choose() with the real backends."""
    from smtpguard.enforce.iptables import IptablesEnforcer, legacy_tables_in_use
    from smtpguard.enforce.nftables import NftablesEnforcer

    return choose(requested, NftablesEnforcer, IptablesEnforcer.for_enforcing,
                  legacy_tables_in_use)
