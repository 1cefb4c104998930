"""How a VM's device is plugged in, and so where its packets can be seen.

- `bridge`: a port of a Linux bridge. Its frames pass the bridge family's
  prerouting hook (and, routed on, the inet family's).
- `routed`: no master; the host routes its packets (inet prerouting).
- `ovs`: a port of Open vSwitch's kernel datapath (master `ovs-system`, kind
  `openvswitch`). OVS's rx_handler switches its frames: no bridge-family and
  no inet hook ever sees them, only the device's own ingress (tc, netdev).
- `macvtap`: the guest writes to /dev/tapN and its packets leave through the
  macvtap device's *transmit* path (tc and netdev egress of macvtapN); the
  answers come in through its receive path (ingress). So the classifier sits
  the other way round there (datapath/attach.py) and enforcement hooks the
  device's egress (enforce/nft_chains.py).

Only the device's own kind and its master's kind decide it.
"""

from __future__ import annotations

from typing import Literal

Attachment = Literal["bridge", "routed", "ovs", "macvtap"]
KINDS: tuple[Attachment, ...] = ("bridge", "routed", "ovs", "macvtap")
# Where netfilter's bridge and inet hooks never see a VM's SYNs: these get a
# netdev-family hook on the device itself, ingress or egress.
NETDEV_HOOK: dict[str, str] = {"ovs": "ingress", "macvtap": "egress"}


def attachment(kind: str, master_kind: str | None) -> Attachment:
    """kind: the device's IFLA_INFO_KIND; master_kind: its master's (None
    without a master)."""
    if kind == "macvtap":
        return "macvtap"
    if master_kind == "openvswitch":
        return "ovs"
    if master_kind is None:
        return "routed"
    return "bridge"  # a Linux bridge (a VRF or bond master is no place for a VM tap)


def swapped(att: str) -> bool:
    """Whether the VM's packets leave through the device's transmit path."""
    return att == "macvtap"
