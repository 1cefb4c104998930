"""Attach the classifier to interfaces as tc filters (clsact, direct action).

We own one (prio, handle) on each hook and name our filters smtpg_<ifname>:
attaching replaces in place (a restart never duplicates and never opens a
gap), and anything named smtpg_* is ours to prune.

The VM-side program (smtpg_ingress: what the VM sends) goes where the VM's
packets pass: the device's ingress hook for a tap or veth, its egress hook
for a macvtap, whose guest writes into the device's transmit path
(datapath/attachment.py); the answer-side program takes the other hook.
"""

from __future__ import annotations

from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from smtpguard.errors import AttachError

PRIO = 25
HANDLE = 0x25
NAME_PREFIX = "smtpg_"
INGRESS = 0xFFFFFFF2  # clsact ingress: what the VM sends
EGRESS = 0xFFFFFFF3  # clsact egress: what is sent to the VM
ETH_P_ALL = 0x0003
ENOENT, EEXIST, ENODEV, EINVAL = 2, 17, 19, 22


def filter_name(ifname: str) -> str:
    return f"{NAME_PREFIX}{ifname}"


def attach(ipr: Any, ifindex: int, ifname: str, ingress_fd: int, egress_fd: int,
           swapped: bool = False) -> None:
    """Install (or replace) both filters on one interface. ingress_fd is the
    program for what the VM sends, egress_fd for what it is sent; swapped:
    the VM sends through the device's transmit path (a macvtap)."""
    try:
        ipr.tc("add", "clsact", ifindex)
    except NetlinkError as exc:
        if exc.code != EEXIST:
            raise AttachError(f"adding clsact to {ifname}: {exc}") from exc
    if swapped:
        ingress_fd, egress_fd = egress_fd, ingress_fd
    for parent, fd, hook in ((INGRESS, ingress_fd, "ingress"), (EGRESS, egress_fd, "egress")):
        try:
            ipr.tc(
                "replace-filter", "bpf", ifindex, handle=HANDLE, fd=fd,
                name=filter_name(ifname), parent=parent, classid=1,
                direct_action=True, prio=PRIO, protocol=ETH_P_ALL,
            )
        except NetlinkError as exc:
            raise AttachError(f"attaching {hook} filter to {ifname}: {exc}") from exc


def detach(ipr: Any, ifindex: int, ifname: str) -> None:
    """Remove our filters; an interface or filter already gone is fine."""
    for parent in (INGRESS, EGRESS):
        try:
            ipr.tc("del-filter", "bpf", ifindex, handle=HANDLE, parent=parent,
                   prio=PRIO, protocol=ETH_P_ALL)
        except NetlinkError as exc:
            if exc.code not in (ENOENT, ENODEV, EINVAL):
                raise AttachError(f"detaching from {ifname}: {exc}") from exc


def ours(ipr: Any, ifindex: int) -> set[str]:
    """The hooks ("ingress", "egress") that carry one of our filters."""
    found: set[str] = set()
    for parent, hook in ((INGRESS, "ingress"), (EGRESS, "egress")):
        try:
            msgs = ipr.get_filters(ifindex, parent=parent)
        except NetlinkError:
            continue
        for msg in msgs:
            name = msg.get_nested("TCA_OPTIONS", "TCA_BPF_NAME")
            if isinstance(name, str) and name.startswith(NAME_PREFIX):
                found.add(hook)
    return found
