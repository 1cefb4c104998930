"""`smtpguard run --cleanup`: turn everything off in this network namespace."""

from __future__ import annotations

from smtpguard import logs
from smtpguard.daemon.state import AgentConfig
from smtpguard.datapath import attach
from smtpguard.datapath.interfaces import dump_links
from smtpguard.datapath.loader import Datapath


def cleanup(cfg: AgentConfig) -> int:
    """Remove every filter we own in this network namespace and our pinned maps."""
    from pyroute2 import IPRoute

    log = logs.get()
    removed = 0
    with IPRoute() as ipr:
        for ev in dump_links():
            if attach.ours(ipr, ev.ifindex):
                attach.detach(ipr, ev.ifindex, ev.ifname)
                removed += 1
                log.info("iface.detached", interface=ev.ifname, reason="cleanup")
    Datapath(cfg.pin_dir, cfg.sizes).unpin()
    tables = chains = False
    if cfg.enforce:
        from smtpguard.enforce.desired import Capabilities
        from smtpguard.enforce.iptables import IptablesEnforcer
        from smtpguard.enforce.nftables import NftablesEnforcer
        from smtpguard.errors import BackendUnavailable

        # Both backends: whichever ran here. Neither creates what is not there.
        try:
            tables = NftablesEnforcer(Capabilities()).remove()
        except BackendUnavailable as exc:
            log.info("cleanup.skipped", backend="nftables", reason=str(exc))
        try:
            chains = IptablesEnforcer().remove()
        except BackendUnavailable as exc:
            log.info("cleanup.skipped", backend="iptables", reason=str(exc))
    log.info("agent.cleaned_up", interfaces=removed, pin_dir=str(cfg.pin_dir),
             nft_tables_removed=tables, iptables_chains_removed=chains)
    return removed
