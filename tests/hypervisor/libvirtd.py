"""A private, real libvirtd for the hypervisor tier, and the domains it runs.

    with Libvirtd() as hv:                       # prefix sgh<5 hex>
        vm = hv.add_vm(1, sends=[Send(hv.net.dest(0), 25, 3)])
        vm.wait_done("r1")                      # -> [Result(ok=3, ...)]
        hv.net.sink.count(port=25)              # 3
        vm.vnets()                              # ["vnet0"]
        hv.restart_libvirtd()                   # the QEMU process lives on

libvirtd and virtlogd are Debian's, started by hand (no systemd here) by
nsholder.py, their parent and QEMU's reaper, in their own network namespace
(hostnet.Network: bridge, taps, sink) and their own mount namespace, where
/etc/libvirt, /run/libvirt, /var/lib/libvirt and /var/log/libvirt are the
kit's directories `hv.dir`/{etc,run,lib,log} (hooks go in etc/hooks). So the
instance defines nothing on the host (no `default` network, no domain XML in
/etc), coexists with a host libvirtd or another test run, and its state goes
with one rmtree.
Clients (the agent, virsh) reach it at `hv.uri`
(qemu:///system?socket=...); its taps are in `hv.netns`.

Everything is named from the prefix and removed by close() (or the `with`),
also when the test failed: domains destroyed and undefined, daemons stopped,
namespaces deleted. A run killed outright is swept by the next one (sweep()).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any
from xml.sax.saxutils import escape

import guest
from hostnet import Network

RUN_ROOT = Path("/run/smtpguard-test")
HERE = Path(__file__).resolve().parent
# QEMU's capabilities, probed once per QEMU/libvirt version (seconds saved per start).
CAPS_CACHE = guest.CACHE / "libvirt-cache"
# Where the private directories appear inside the daemons' mount namespace.
MOUNTS = {"etc": "/etc/libvirt", "run": "/run/libvirt", "lib": "/var/lib/libvirt",
          "log": "/var/log/libvirt"}
LIBVIRTD_CONF = """\
auth_unix_rw = "none"
unix_sock_rw_perms = "0700"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
"""
# QEMU as root with no relabelling: the cached guest files are shared by runs,
# and no cgroups (the daemons' /sys is their namespace's, without them).
QEMU_CONF = """\
user = "+0"
group = "+0"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
"""
VIRTLOGD_CONF = 'log_outputs = "3:file:/var/log/libvirt/virtlogd.log"\n'


def unique(prefix: str = "sgh") -> str:
    return f"{prefix}{uuid.uuid4().hex[:5]}"


class Libvirtd:
    """One private libvirtd + virtlogd and the network its guests use."""

    def __init__(self, prefix: str | None = None) -> None:
        self.prefix = prefix or unique()
        self.dir = RUN_ROOT / self.prefix
        self.net = Network(self.prefix)
        self.uri = f"qemu:///system?socket={self.dir / 'run' / 'libvirt-sock'}"
        self._holder: subprocess.Popen[bytes] | None = None
        self._conn: Any = None

    @property
    def netns(self) -> str:
        return self.net.netns

    # -- lifetime -----------------------------------------------------------

    def __enter__(self) -> Libvirtd:
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def open(self) -> None:
        sweep()
        self.dir.mkdir(parents=True)
        (self.dir / "owner").write_text(_proc_identity(os.getpid()))
        for sub in (*MOUNTS, "vm"):
            (self.dir / sub).mkdir()
        CAPS_CACHE.mkdir(parents=True, exist_ok=True)
        (self.dir / "etc" / "libvirtd.conf").write_text(LIBVIRTD_CONF)
        (self.dir / "etc" / "qemu.conf").write_text(QEMU_CONF)
        (self.dir / "etc" / "virtlogd.conf").write_text(VIRTLOGD_CONF)
        self.net.up()
        self._start_holder()
        self._start("virtlogd")
        _wait(lambda: (self.dir / "run" / "virtlogd-sock").exists(), 30, "virtlogd's socket")
        self.start_libvirtd()

    def close(self) -> None:
        """Remove everything this kit made; every step runs even if one fails."""
        errors: list[BaseException] = []

        def step(fn: Any) -> None:
            try:
                fn()
            except Exception as exc:
                errors.append(exc)

        if self._holder is not None:
            step(self._remove_domains)
        step(self._kill_qemus)
        for name in ("libvirtd", "virtlogd"):
            step(lambda name=name: self._stop(name))
        step(self._stop_holder)
        step(self.net.close)
        step(lambda: _rmtree(self.dir))
        if errors:
            raise ExceptionGroup(f"cleaning up hypervisor kit {self.prefix}", errors)

    # -- daemons ------------------------------------------------------------

    def start_libvirtd(self, timeout: float = 60) -> None:
        """Start libvirtd (it reconnects to running QEMU processes) and wait
        until qemu:///system answers."""
        self._start("libvirtd")
        _wait(self._answers, timeout, "libvirtd to answer", self._daemon_log)

    def stop_libvirtd(self) -> None:
        """SIGTERM and reap libvirtd; QEMU processes and virtlogd stay."""
        self._stop("libvirtd")

    def restart_libvirtd(self) -> None:
        self.stop_libvirtd()
        self.start_libvirtd()

    def pid(self, daemon: str) -> int | None:
        """The running daemon's pid ("libvirtd" or "virtlogd"), else None."""
        if self._holder is None:
            return None
        answer = self._ask(f"pid {daemon}")
        return None if answer == "-" else int(answer)

    def conn(self) -> Any:
        """A libvirt connection to this instance (reopened after a restart)."""
        import libvirt

        if self._conn is None or not _alive(self._conn):
            libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # raise, don't print
            self._conn = libvirt.open(self.uri)
        return self._conn

    def _answers(self) -> bool:
        import libvirt

        if self.pid("libvirtd") is None:
            raise RuntimeError(f"libvirtd exited:\n{self._daemon_log()}")
        try:
            self.conn().getVersion()
            return True
        except libvirt.libvirtError:
            self._conn = None
            return False

    def _start_holder(self) -> None:
        """nsholder.py in the hypervisor's network namespace and a new mount
        namespace, where /sys shows that network namespace's links and
        libvirt's system directories are the kit's own."""
        binds = [(self.dir / sub, target) for sub, target in MOUNTS.items()]
        binds.append((CAPS_CACHE, "/var/cache/libvirt"))
        script = "set -e; umount -l /sys; mount -t sysfs sysfs /sys; " + "".join(
            f"mkdir -p {t}; mount --bind {s} {t}; " for s, t in binds) + \
            f"exec {sys.executable} {HERE / 'nsholder.py'}"
        self._holder = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{self.netns}", "--", "unshare", "--mount",
             "--propagation", "slave", "--", "sh", "-c", script],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True)
        (self.dir / "holder.pid").write_text(str(self._holder.pid))
        assert self._holder.stdout is not None
        line = self._holder.stdout.readline()
        if line.strip() != b"ready":
            raise RuntimeError(f"libvirtd's namespace holder: {line.decode().strip()}")

    def _ask(self, line: str) -> str:
        assert self._holder is not None
        assert self._holder.stdin is not None and self._holder.stdout is not None
        self._holder.stdin.write(line.encode() + b"\n")
        self._holder.stdin.flush()
        answer = self._holder.stdout.readline().decode()
        if not answer:
            raise RuntimeError(f"libvirtd's namespace holder exited (asked {line!r})")
        return answer.split()[1]

    def _stop_holder(self) -> None:
        """Its stdin closed, it kills whatever it still has and exits."""
        if self._holder is not None:
            assert self._holder.stdin is not None and self._holder.stdout is not None
            with contextlib.suppress(OSError):
                self._holder.stdin.close()
            try:
                self._holder.wait(30)
            except subprocess.TimeoutExpired:
                self._holder.kill()
                self._holder.wait()
            self._holder.stdout.close()
            self._holder = None

    def _start(self, daemon: str) -> None:
        if self.pid(daemon) is not None:
            return
        # libvirtd pinned to one CPU: it compares the host's CPUID with the
        # cached QEMU capabilities', and the vCPUs here differ, so unpinned it
        # re-probes QEMU (8 s) on every other start. QEMU gets all CPUs back.
        pin = "taskset -c 0 " if daemon == "libvirtd" else ""
        out, pidfile = self.dir / f"{daemon}.out", self.dir / f"{daemon}.pid"
        self._ask(f"start {daemon} {out} {pin}{daemon} -p {pidfile}")

    def _stop(self, daemon: str) -> None:
        if daemon == "libvirtd" and self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None
        if self._holder is not None:
            self._ask(f"stop {daemon} 30")

    def _daemon_log(self) -> str:
        return _tail(self.dir / "libvirtd.out") + _tail(self.dir / "log" / "libvirtd.log")

    # -- domains ------------------------------------------------------------

    def define(self, vm: str, g: guest.Guest, cmdline: str, *,
               bridges: Sequence[str] = ("br0",), direct: Sequence[str] = (),
               macs: Sequence[str] | None = None, devices: str = "",
               metadata: str = "", memory_mib: int = 128, kvm: bool = False) -> Domain:
        """Define (persistently, not start) domain <prefix>-<vm>: direct kernel
        boot of g with cmdline, one virtio NIC per bridge, then one macvtap
        NIC per lower device in `direct` (`<interface type='direct'>`, mode
        bridge: libvirt makes a macvtapN on that device), console on ttyS0 in
        a file, the guest's control channel on ttyS1, `metadata` inside
        <metadata> and `devices` inside <devices> verbatim. TCG unless kvm=True."""
        name = f"{self.prefix}-{vm}"
        count = len(bridges) + len(direct)
        macs = list(macs or [_mac(name, i) for i in range(count)])
        if len(macs) != count:
            raise ValueError(f"{len(macs)} MACs for {count} NICs")
        nics = "".join(
            f"<interface type='bridge'><source bridge='{b}'/><mac address='{m}'/>"
            "<model type='virtio'/></interface>"
            for b, m in zip(bridges, macs[:len(bridges)], strict=True))
        nics += "".join(
            f"<interface type='direct'><source dev='{d}' mode='bridge'/><mac address='{m}'/>"
            "<model type='virtio'/></interface>"
            for d, m in zip(direct, macs[len(bridges):], strict=True))
        dom = Domain(self, name, macs)
        kind = "kvm" if kvm else "qemu"
        xml = f"""<domain type='{kind}'>
  <name>{name}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <metadata>{metadata}</metadata>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{g.kernel}</kernel>
    <initrd>{g.initrd}</initrd>
    <cmdline>{escape(cmdline)}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    {nics}
    {devices}
    <serial type='file'><source path='{dom.console_path}'/><target port='0'/></serial>
    <serial type='unix'><source mode='bind' path='{dom.ctl_path}'/><target port='1'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>"""
        self.conn().defineXML(xml)
        return dom

    def add_vm(self, n: int, sends: Sequence[guest.Send] = (), *, ipv6: bool = True,
               start: bool = True, metadata: str = "", **cmdline: Any) -> Domain:
        """Guest n (vm<n>, 198.18.0.(10+n), fdac:25::(10+n)) on br0, defined and
        started; `sends` run once at boot (more via cmdline keywords)."""
        net = self.net.guest_net(n, 4) | (self.net.guest_net(n, 6) if ipv6 else {})
        line = guest.cmdline(**net, sends=sends, **cmdline)
        dom = self.define(f"vm{n}", guest.build(), line, metadata=metadata)
        if start:
            dom.start()
        return dom

    def domains(self) -> list[str]:
        """Names of all domains this instance knows, running or not."""
        return sorted(d.name() for d in self.conn().listAllDomains())

    def _remove_domains(self) -> None:
        if self.pid("libvirtd") is None:
            self.start_libvirtd(timeout=20)
        conn = self.conn()
        for dom in conn.listAllDomains():
            if dom.isActive():
                dom.destroy()
            dom.undefine()
        for net in conn.listAllNetworks():
            if net.isActive():
                net.destroy()
            net.undefine()

    def _kill_qemus(self) -> None:
        """QEMU processes libvirt did not stop (it was killed, or failed)."""
        _kill_pidfiles(self.dir / "run" / "qemu", "qemu-system")


class Domain:
    """A domain of the kit, looked up by name on each call (so it outlives
    libvirtd restarts)."""

    def __init__(self, hv: Libvirtd, name: str, macs: Sequence[str]) -> None:
        self.hv = hv
        self.name = name
        self.macs = list(macs)
        self.console_path = hv.dir / "vm" / f"{name}.console"
        self.ctl_path = hv.dir / "vm" / f"{name}.ctl"

    def dom(self) -> Any:
        return self.hv.conn().lookupByName(self.name)

    @property
    def uuid(self) -> str:
        return str(self.dom().UUIDString())

    def start(self) -> None:
        """Boot it (a fresh console log; libvirt picks the next free vnetN)."""
        self.dom().create()

    def destroy(self) -> None:
        """Power it off at once (its taps go)."""
        with contextlib.suppress(Exception):
            if not self.dom().isActive():
                return
        self.dom().destroy()

    def undefine(self) -> None:
        self.destroy()
        self.dom().undefine()

    def is_active(self) -> bool:
        return bool(self.dom().isActive())

    def vnets(self) -> list[str]:
        """Its tap names now, from the live XML (empty when shut off)."""
        root = ET.fromstring(self.dom().XMLDesc(0))
        return [t.get("dev", "") for t in root.findall("./devices/interface/target")]

    def qemu_pid(self) -> int | None:
        path = self.hv.dir / "run" / "qemu" / f"{self.name}.pid"
        with contextlib.suppress(FileNotFoundError, ValueError):
            return int(path.read_text())
        return None

    def console(self) -> str:
        """The serial console so far (this boot's)."""
        with contextlib.suppress(FileNotFoundError):
            return self.console_path.read_text(errors="replace")
        return ""

    def wait_console(self, marker: str, timeout: float = 60) -> str:
        """The console once it contains marker (fails with the console's
        tail if the domain stops or the time runs out)."""
        def seen() -> bool:
            if marker in self.console():
                return True
            if not self.is_active():
                raise AssertionError(f"{self.name} stopped before {marker!r}:\n"
                                     f"{self.console()[-3000:]}")
            return False

        _wait(seen, timeout, f"{marker!r} on {self.name}'s console",
              lambda: self.console()[-3000:])
        return self.console()

    def wait_done(self, id: str = "r1", timeout: float = 60) -> list[guest.Result]:
        """The results of boot round `id` (r1, r2, ... with sg.repeat)."""
        return guest.results(self.wait_console(f"SGDONE id={id}\n", timeout), id)

    def request(self, sends: Sequence[guest.Send], id: str | None = None,
                timeout: float | None = None) -> list[guest.Result]:
        """Have the running guest make these attempts now, over its control
        channel (ttyS1), and return its results (on the console too by then).
        Needs the guest's control channel (cmdline(ctl=True), the default)."""
        self.wait_console("SGREADY")
        id = id or f"c{uuid.uuid4().hex[:6]}"
        words = " ".join(s.word() for s in sends)
        timeout = timeout or 30 + sum(s.count for s in sends) * 10
        buf = b""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.ctl_path))
            s.sendall(f"send {id} {words}\n".encode())
            while f"SGDONE id={id}\n".encode() not in buf:
                chunk = s.recv(4096)
                if not chunk:
                    raise AssertionError(f"{self.name}'s control channel closed: {buf!r}")
                buf += chunk
        # ttyS0 drains behind ttyS1: return once the console has it too.
        self.wait_console(f"SGDONE id={id}\n", 10)
        return guest.results(buf.decode(errors="replace"), id)


def sweep() -> list[str]:
    """Remove kits whose test process is gone (killed before its cleanup ran)."""
    removed = []
    for d in sorted(RUN_ROOT.glob("sgh*")):
        try:
            owner = (d / "owner").read_text()
        except FileNotFoundError:  # being created, unless it is old
            if time.time() - d.stat().st_mtime < 60:
                continue
            owner = ""
        if owner and _proc_identity(int(owner.split()[0])) == owner:
            continue
        _kill_pidfiles(d / "run" / "qemu", "qemu-system")
        for name, comm in (("holder.pid", "nsholder"), ("libvirtd.pid", "libvirtd"),
                           ("virtlogd.pid", "virtlogd")):
            _kill_pidfile(d / name, comm)
        Network(d.name).close()
        _rmtree(d)
        removed.append(d.name)
    return removed


def _mac(name: str, i: int) -> str:
    h = uuid.uuid5(uuid.NAMESPACE_DNS, f"{name}/{i}").bytes
    return "52:54:00:" + ":".join(f"{b:02x}" for b in h[:3])


def _alive(conn: Any) -> bool:
    """isAlive() alone trusts a socket the daemon has dropped (an idle
    connection through a long vagrant run): a round trip proves it."""
    try:
        return bool(conn.isAlive()) and conn.getLibVersion() > 0
    except Exception:
        return False


def _wait(cond: Any, timeout: float, what: str, detail: Any = None) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            extra = f":\n{detail()}" if detail is not None else ""
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}{extra}")
        time.sleep(0.1)


def _proc_identity(pid: int) -> str:
    """pid and start time: a pid the kernel has reused reads differently."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return f"{pid} {stat.rsplit(')', 1)[1].split()[19]}"


def _kill_pidfiles(directory: Path, comm: str) -> None:
    for pidfile in directory.glob("*.pid"):
        _kill_pidfile(pidfile, comm)


def _kill_pidfile(pidfile: Path, comm: str) -> None:
    """SIGKILL the process named in pidfile if it still is a `comm`, and wait
    until it has exited (a zombie counts: PID 1 reaps it)."""
    try:
        pid = int(pidfile.read_text())
        if comm not in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
            return
        os.kill(pid, signal.SIGKILL)
    except (OSError, ValueError):
        return
    _wait(lambda: _gone(pid), 10, f"{comm} {pid} to exit")


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


def _tail(path: Path, n: int = 3000) -> str:
    with contextlib.suppress(FileNotFoundError):
        return path.read_text(errors="replace")[-n:]
    return ""


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":  # by hand, after a run was killed: python libvirtd.py
    print("\n".join(sweep()) or "nothing to sweep")
