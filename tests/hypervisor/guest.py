"""The guest for the real-hypervisor tier: Debian's cloud kernel and a busybox
initramfs whose init sends SMTP from the guest's own TCP stack.

    g = guest.build()                       # ~30 ms cold, then cached
    line = guest.cmdline(ip="198.18.0.10/24", gw="198.18.0.2",
                         sends=[guest.Send("198.19.0.1", 25, 3)])
    # ... boot g.kernel / g.initrd with `line` under libvirt, then
    guest.results(console_text)              # -> [Result(id="r1", port=25, ok=3, ...)]

The init script is the guest's whole contract. It reads `sg.*` words from the
kernel command line (module-style parameters: the kernel keeps them out of
init's argv, so init reads /proc/cmdline):

    sg.ip=A/LEN  sg.gw=A  sg.ip6=A/LEN  sg.gw6=A   eth0 (IPv6 without DAD)
    sg.ip1=A/LEN  sg.ip1_6=A/LEN                   eth1, if the domain has one
    sg.send=HOST:PORT:COUNT[,...]                  IPv6 hosts in brackets
    sg.timeout=S      per attempt (connect and dialogue), default 3
    sg.delay=S        before the first round, default 0
    sg.repeat=S       another round every S seconds, forever
    sg.ctl=1          accept `send ID TARGET...` lines on ttyS1
    sg.poweroff=1     power off after the rounds (otherwise idle forever)

Each attempt is a fresh TCP connection (busybox nc) that reads the banner,
says QUIT and counts as ok only if the sink's 221 came back. On the serial
console (ttyS0) the guest prints, one line each:

    SGREADY ip=198.18.0.10/24          (after the control channel listens)
    SGRESULT id=r1 host=198.19.0.1 port=25 ok=2 fail=1 refused=1 timeout=0 unreach=0
    SGDONE id=r1

Rounds from the command line have ids r1, r2, ...; control-channel requests
carry the caller's id and get the same lines back on ttyS1. Without
sg.poweroff the guest stays up, so its interface stays where the test put it.
"""

from __future__ import annotations

import hashlib
import ipaddress
import lzma
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(os.environ.get("SMTPGUARD_TEST_CACHE", "/var/cache/smtpguard-test"))
# Load order matters: each needs the ones before it (HYPERVISOR.md).
MODULES = ("virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev",
           "virtio_pci", "failover", "net_failover", "virtio_net")

INIT = r"""#!/bin/busybox sh
# PID 1 of the smtpguard test guest; see tests/hypervisor/guest.py for the contract.
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
export PATH=/bin
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
for m in $(cat /etc/sg-modules); do
	insmod /lib/modules/$m.ko || echo "SGERROR insmod $m"
done

IP= GW= IP6= GW6= IP1= IP1_6= SENDS= TMO=3 DELAY=0 REPEAT= CTL= OFF=
for w in $(cat /proc/cmdline); do
	case "$w" in
	sg.ip=*) IP=${w#*=} ;;
	sg.gw=*) GW=${w#*=} ;;
	sg.ip6=*) IP6=${w#*=} ;;
	sg.gw6=*) GW6=${w#*=} ;;
	sg.ip1=*) IP1=${w#*=} ;;
	sg.ip1_6=*) IP1_6=${w#*=} ;;
	sg.send=*|sg.send6=*) SENDS="$SENDS $(echo "${w#*=}" | tr , ' ')" ;;
	sg.timeout=*) TMO=${w#*=} ;;
	sg.delay=*) DELAY=${w#*=} ;;
	sg.repeat=*) REPEAT=${w#*=} ;;
	sg.ctl=1) CTL=1 ;;
	sg.poweroff=1) OFF=1 ;;
	esac
done

nic() { # IFNAME ADDR4 ADDR6
	n=0
	while [ ! -e /sys/class/net/$1 ] && [ $n -lt 50 ]; do sleep 0.1; n=$((n+1)); done
	[ -e /sys/class/net/$1 ] || { echo "SGERROR no $1"; return; }
	echo 0 > /proc/sys/net/ipv6/conf/$1/accept_dad
	echo 0 > /proc/sys/net/ipv6/conf/$1/router_solicitations
	ip link set $1 up
	[ -n "$2" ] && ip addr add $2 dev $1
	[ -n "$3" ] && ip -6 addr add $3 dev $1
}
ip link set lo up
[ -n "$IP$IP6" ] && nic eth0 "$IP" "$IP6"
[ -n "$IP1$IP1_6" ] && nic eth1 "$IP1" "$IP1_6"
[ -n "$GW" ] && ip route add default via $GW
[ -n "$GW6" ] && ip -6 route add default via $GW6

attempts() { # ID HOST:PORT:COUNT ; [v6]:PORT:COUNT
	count=${2##*:}; rest=${2%:*}; port=${rest##*:}; host=${rest%:*}
	host=${host#[}; host=${host%]}
	ok=0 fail=0 refused=0 tmo=0 unreach=0 i=0
	while [ $i -lt $count ]; do
		out=$(printf 'QUIT\r\n' | timeout $((TMO+1)) nc -w $TMO $host $port 2>&1)
		case "$out" in
		*221*) ok=$((ok+1)) ;;
		*refused*) fail=$((fail+1)); refused=$((refused+1)) ;;
		*unreachable*|*"No route"*|*prohibited*) fail=$((fail+1)); unreach=$((unreach+1)) ;;
		*) fail=$((fail+1)); tmo=$((tmo+1)) ;;
		esac
		i=$((i+1))
	done
	echo "SGRESULT id=$1 host=$host port=$port ok=$ok fail=$fail" \
		"refused=$refused timeout=$tmo unreach=$unreach"
}

if [ -n "$CTL" ] && [ -e /dev/ttyS1 ]; then
	(
		stty -F /dev/ttyS1 raw -echo
		exec 3<>/dev/ttyS1
		: > /tmp/ctl.ready
		while read -r cmd id targets <&3; do
			[ "$cmd" = send ] || { echo "SGERROR id=$id unknown $cmd" >&3; continue; }
			for t in $targets; do
				r=$(attempts "$id" "$t")
				echo "$r"; echo "$r" >&3
			done
			echo "SGDONE id=$id"; echo "SGDONE id=$id" >&3
		done
	) &
	n=0
	while [ ! -e /tmp/ctl.ready ] && [ $n -lt 50 ]; do sleep 0.1; n=$((n+1)); done
fi

echo "SGREADY ip=$IP ip6=$IP6 ip1=$IP1"
[ "$DELAY" != 0 ] && sleep "$DELAY"
round=1
while [ -n "$SENDS" ]; do
	for t in $SENDS; do attempts "r$round" "$t"; done
	echo "SGDONE id=r$round"
	[ -n "$REPEAT" ] || break
	sleep "$REPEAT"
	round=$((round+1))
done
[ -n "$OFF" ] && poweroff -f
while :; do sleep 3600; done
"""


class GuestBuildError(RuntimeError):
    """The guest kernel or initramfs could not be built."""


@dataclass(frozen=True)
class Guest:
    """A built guest: boot `kernel` with `initrd` and a cmdline() line."""

    kernel: Path
    initrd: Path
    release: str  # the kernel's uname -r, e.g. 6.1.0-57-cloud-amd64
    key: str  # the cache entry's name: kernel package_version-hash


@dataclass(frozen=True)
class Send:
    """`count` attempts, one TCP connection each, to host:port."""

    host: str
    port: int
    count: int

    def word(self) -> str:
        host = f"[{self.host}]" if ipaddress.ip_address(self.host).version == 6 else self.host
        return f"{host}:{self.port}:{self.count}"


@dataclass(frozen=True)
class Result:
    """One SGRESULT line: the outcome of one Send, as the guest saw it."""

    id: str
    host: str
    port: int
    ok: int
    fail: int
    refused: int
    timeout: int
    unreach: int


def unpacked(name: str, cache: Path = CACHE) -> Path:
    """A package scripts/hypervisor-setup.sh unpacked: "kernel" (the cloud
    kernel) or "busybox" (busybox-static: no loader or libraries needed)."""
    found = sorted(p.parent for p in (cache / name).glob("*/.complete"))
    if not found:
        raise GuestBuildError(f"nothing unpacked under {cache / name}: "
                              "run scripts/hypervisor-setup.sh")
    return found[-1]


def build(cache: Path = CACHE) -> Guest:
    """The guest for the unpacked kernel and busybox, built once per kernel
    package version, busybox and init script (then the cached files)."""
    kdir = unpacked("kernel", cache)
    vmlinuz = sorted((kdir / "boot").glob("vmlinuz-*"))
    if not vmlinuz:
        raise GuestBuildError(f"no boot/vmlinuz-* in {kdir}")
    release = vmlinuz[-1].name.removeprefix("vmlinuz-")
    busybox = (unpacked("busybox", cache) / "bin" / "busybox").read_bytes()
    digest = hashlib.sha256()
    for part in (INIT.encode(), " ".join(MODULES).encode(), busybox):
        digest.update(hashlib.sha256(part).digest())
    key = f"{kdir.name}-{digest.hexdigest()[:12]}"
    out = cache / "guest" / key
    guest = Guest(out / "vmlinuz", out / "initrd.cpio", release, key)
    if (out / ".complete").exists():
        return guest
    (cache / "guest").mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=cache / "guest"))
    tmp.chmod(0o755)
    try:
        shutil.copyfile(vmlinuz[-1], tmp / "vmlinuz")
        modules = {m: _module(kdir / "lib/modules" / release, m) for m in MODULES}
        (tmp / "initrd.cpio").write_bytes(_initramfs(busybox, modules))
        (tmp / ".complete").touch()
        _replace_older(cache / "guest", keep=tmp)
        try:
            tmp.rename(out)
        except OSError:  # a concurrent build finished first: theirs is the same
            if not (out / ".complete").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return guest


def cmdline(ip: str | None = None, gw: str | None = None, ip6: str | None = None,
            gw6: str | None = None, ip1: str | None = None, ip1_6: str | None = None,
            sends: Sequence[Send] = (), timeout: int = 3, delay: float = 0,
            repeat: float | None = None, ctl: bool = True, poweroff: bool = False) -> str:
    """The kernel command line that makes the guest do this (see the module doc)."""
    words = ["console=ttyS0", "quiet", "loglevel=3", "panic=-1"]
    for name, value in (("ip", ip), ("gw", gw), ("ip6", ip6), ("gw6", gw6), ("ip1", ip1),
                        ("ip1_6", ip1_6)):
        if value:
            words.append(f"sg.{name}={value}")
    if sends:
        words.append("sg.send=" + ",".join(s.word() for s in sends))
    words.append(f"sg.timeout={timeout}")
    if delay:
        words.append(f"sg.delay={delay:g}")
    if repeat is not None:
        words.append(f"sg.repeat={repeat:g}")
    if ctl:
        words.append("sg.ctl=1")
    if poweroff:
        words.append("sg.poweroff=1")
    return " ".join(words)


_RESULT = re.compile(r"^SGRESULT (.*)$", re.M)


def results(text: str, id: str | None = None) -> list[Result]:
    """The SGRESULT lines in console (or control-channel) text, oldest first."""
    out = []
    for m in _RESULT.finditer(text):
        f = dict(kv.split("=", 1) for kv in m.group(1).split())
        if id is not None and f["id"] != id:
            continue
        out.append(Result(id=f["id"], host=f["host"], port=int(f["port"]), ok=int(f["ok"]),
                          fail=int(f["fail"]), refused=int(f["refused"]),
                          timeout=int(f["timeout"]), unreach=int(f["unreach"])))
    return out


def done_ids(text: str) -> list[str]:
    """Ids of the rounds and requests the guest has finished, in order."""
    return re.findall(r"^SGDONE id=(\S+)", text, re.M)


def _module(moddir: Path, name: str) -> bytes:
    """A module's bytes, decompressed: busybox insmod takes plain .ko only."""
    for path in moddir.rglob(f"{name}.ko*"):
        data = path.read_bytes()
        if path.name.endswith(".ko"):
            return data
        if path.name.endswith(".ko.xz"):
            return lzma.decompress(data)
        if path.name.endswith(".ko.zst"):
            return subprocess.run(["zstd", "-dc"], input=data, capture_output=True,
                                  check=True).stdout
    raise GuestBuildError(f"module {name} not found under {moddir}")


def _replace_older(root: Path, keep: Path) -> None:
    """Builds for other init scripts or kernels are stale: remove them, once
    an hour old (a concurrent run of another checkout may be booting one)."""
    for old in root.iterdir():
        if old != keep and time.time() - old.stat().st_mtime > 3600:
            shutil.rmtree(old, ignore_errors=True)


def _initramfs(busybox: bytes, modules: dict[str, bytes]) -> bytes:
    """An uncompressed newc cpio: the kernel unpacks it without a decompressor,
    and device nodes need no mknod privilege when written by hand."""
    entries: list[tuple[str, int, bytes, tuple[int, int]]] = [
        (d, 0o040755, b"", (0, 0))
        for d in ("bin", "dev", "etc", "lib", "lib/modules", "proc", "sys", "tmp")
    ]
    entries += [
        ("dev/console", 0o020600, b"", (5, 1)),
        ("bin/busybox", 0o100755, busybox, (0, 0)),
        ("init", 0o100755, INIT.encode(), (0, 0)),
        ("etc/sg-modules", 0o100644, "\n".join(modules).encode() + b"\n", (0, 0)),
    ]
    entries += [(f"lib/modules/{m}.ko", 0o100644, data, (0, 0)) for m, data in modules.items()]
    return b"".join(_cpio_entry(i + 1, *e) for i, e in enumerate(entries)) + _cpio_entry(
        0, "TRAILER!!!", 0, b"", (0, 0))


def _cpio_entry(ino: int, name: str, mode: int, data: bytes, rdev: tuple[int, int]) -> bytes:
    nlink = 2 if mode & 0o040000 else 1
    fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1],
              len(name) + 1, 0)
    head = b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0"
    return _pad(head) + _pad(data)


def _pad(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) % 4)

