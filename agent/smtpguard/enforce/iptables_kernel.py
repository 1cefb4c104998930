"""iptables-legacy's kernel side and library: whether this namespace has
legacy tables, loading the modules, python-iptables itself."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from smtpguard.errors import BackendUnavailable

PROC = Path("/proc/thread-self/net")  # this thread's namespace (the lab runs agents in threads)
TABLE_NAMES = {"ipv4": "ip_tables_names", "ipv6": "ip6_tables_names"}


def legacy_tables_in_use(proc: Path = PROC) -> bool:
    """Whether this network namespace already has iptables-legacy tables."""
    return any((proc / n).exists() and (proc / n).read_text().strip()
               for n in TABLE_NAMES.values())


def load_iptc() -> Any:
    """python-iptables (it loads libiptc on import)."""
    try:
        import iptc
    except (ImportError, OSError) as exc:  # OSError: libip4tc/libxtables missing
        raise BackendUnavailable(f"python-iptables is not usable: {exc}") from exc
    return iptc


# The tables, then the sets and their match (which the kernel also loads on first use).
MODULES = ("ip_tables", "iptable_filter", "ip6_tables", "ip6table_filter",
           "ip_set", "ip_set_hash_netiface", "xt_set")


def _modprobe() -> None:
    subprocess.run(["modprobe", "-q", "-a", *MODULES], stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


def kernel_ready(proc: Path = PROC, load: Callable[[], None] = _modprobe) -> None:
    """The kernel's iptables-legacy must be loaded: libiptc cannot load it
    ("iptables who? (do you need to insmod?)"), and neither can the service,
    whose unit has no CAP_SYS_MODULE. A host that runs iptables-legacy has
    it; for one that does not, modprobe is tried (it works for root outside
    the unit), then the error says what to load."""
    if all((proc / n).exists() for n in TABLE_NAMES.values()):
        return
    load()
    missing = [n for n in TABLE_NAMES.values() if not (proc / n).exists()]
    if missing:
        raise BackendUnavailable(
            f"the kernel's iptables-legacy is not loaded (no {', '.join(missing)} in "
            f"/proc/net) and this process may not load it: run `modprobe -a "
            f"{' '.join(MODULES)}` (and list them in /etc/modules-load.d/ to keep them), "
            "or use the nftables backend")
