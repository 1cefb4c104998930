"""The fleet over TLS (fleet.tls: ca, cert, key; an https endpoint) against a
real etcd that serves clients on TLS only and requires a client certificate
from its CA: FleetSync's gRPC client opens a verified TLS channel with this
host's certificate, and everything the fleet does (leases, compare-and-swap
writes, the arrival read, watches) works on it; a host without a client
certificate is refused and never connects. Certificates are made here, with
the openssl CLI, for this run only."""

from __future__ import annotations

import contextlib
import json
import secrets
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fleetkit import _free_ports, stop_process, wait

from conftest import require_root, unique
from smtpguard.fleet.record import FleetRecord
from smtpguard.fleet.sync import FleetSync
from smtpguard.policy.model import Fleet as FleetPolicy
from smtpguard.policy.model import FleetTls

ETCD = "/usr/bin/etcd"
SERVER_EXT = """basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
# etcd 3.4's JSON gateway dials its own gRPC port with the server's certificate.
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
"""
CLIENT_EXT = """basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
"""


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(cwd: Path, *args: str) -> None:
    out = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True,
                         timeout=30, stdin=subprocess.DEVNULL)
    if out.returncode != 0:
        raise RuntimeError(f"openssl {args[0]}: {out.stderr.strip()}")


def make_pki(d: Path) -> Pki:
    """A throwaway CA (P-256, a day), a server certificate for 127.0.0.1 and
    localhost, and a client certificate, both signed by it."""
    d.mkdir()
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl(d, "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
             "-subj", "/CN=smtpguard test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for name, cn, ext in (("server", "127.0.0.1", SERVER_EXT),
                          ("client", "smtpguard test host", CLIENT_EXT)):
        (d / f"{name}.ext").write_text(ext)
        _openssl(d, "req", "-new", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={cn}")
        _openssl(d, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-set_serial", f"0x{secrets.token_hex(8)}", "-days", "1",
                 "-extfile", f"{name}.ext", "-out", f"{name}.crt")
    return Pki(d / "ca.crt", d / "server.crt", d / "server.key",
               d / "client.crt", d / "client.key")


class TlsEtcd:
    """etcd on 127.0.0.1 (unused ports), its clients on TLS only and each with
    a certificate from pki's CA; started and stopped as
    fleetkit.EtcdKit(loopback=True), whose plain-HTTP URLs and flags cannot
    be given TLS without editing it. (etcd requires client certificates
    whenever --trusted-ca-file is set, --client-cert-auth or not:
    pkg/transport TLSInfo.ServerConfig.)"""

    def __init__(self, pki: Pki, data: Path, prefix: str) -> None:
        client, peer = _free_ports(2)
        self.pki = pki
        self.url, self.peer = f"https://127.0.0.1:{client}", f"http://127.0.0.1:{peer}"
        self.prefix = f"/sgt/{prefix}"  # the fleet's key prefix for this run
        self.data = data
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.data.mkdir(exist_ok=True)
        with open(self.data / "etcd.log", "ab") as log:
            self.proc = subprocess.Popen(
                [ETCD, "--name", "sgt", "--data-dir", str(self.data / "member"),
                 "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                 "--cert-file", str(self.pki.server_cert),
                 "--key-file", str(self.pki.server_key),
                 "--trusted-ca-file", str(self.pki.ca), "--client-cert-auth",
                 "--listen-peer-urls", self.peer,
                 "--initial-advertise-peer-urls", self.peer,
                 "--initial-cluster", f"sgt={self.peer}"],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not self.healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"etcd did not start: {self.log()[-2000:]}")
            time.sleep(0.2)

    def healthy(self) -> bool:
        """etcd's /health, over TLS with the client certificate: it has a leader."""
        ctx = ssl.create_default_context(cafile=str(self.pki.ca))
        ctx.load_cert_chain(self.pki.client_cert, self.pki.client_key)
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2, context=ctx) as r:
                return bool(json.loads(r.read()).get("health") == "true")
        except OSError:
            return False

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def log(self) -> str:
        return (self.data / "etcd.log").read_text(errors="replace")


class Host:
    """One FleetSync (the agent's fleet thread and watches) on etcd over TLS,
    watching the records of `vms`."""

    def __init__(self, etcd: TlsEtcd, name: str, tls: FleetTls,
                 vms: tuple[str, ...] = ()) -> None:
        self.got: list[FleetRecord] = []
        cfg = FleetPolicy(endpoints=(etcd.url,), prefix=etcd.prefix, host=name, tls=tls)
        self.sync = FleetSync(cfg, self.got.append, [], host=name)
        self.sync.want(vms)
        self.sync.start()

    def has(self, vm: str, timeout: float = 15, **want: Any) -> FleetRecord:
        """The last record of vm received, once there is one with these fields."""
        def last() -> FleetRecord | None:
            rec = next((r for r in reversed(self.got) if r.vm == vm), None)
            ok = rec is not None and all(getattr(rec, k) == v for k, v in want.items())
            return rec if ok else None
        rec: FleetRecord = wait(last, timeout)
        return rec


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
def etcd(pki: Pki, tmp_path: Path) -> Iterator[TlsEtcd]:
    require_root()
    e = TlsEtcd(pki, tmp_path / "etcd", unique("sgtls"))
    try:
        e.start()
        yield e
    finally:
        e.stop()


@pytest.fixture
def host(etcd: TlsEtcd) -> Iterator[Callable[..., Host]]:
    """Makes Hosts on this etcd; every one is stopped at teardown (before etcd)."""
    with contextlib.ExitStack() as made:
        def make(name: str, tls: FleetTls, vms: tuple[str, ...] = ()) -> Host:
            h = Host(etcd, name, tls, vms)
            made.callback(h.sync.stop)
            return h
        yield make


def full(pki: Pki) -> FleetTls:
    return FleetTls(ca=str(pki.ca), cert=str(pki.client_cert), key=str(pki.client_key))


def test_records_go_both_ways_over_tls_with_client_certificates(
        host: Callable[..., Host], pki: Pki) -> None:
    """With fleet.tls, a block published on one host reaches another on its
    watch, the arrival read returns it, and a release goes back the same way:
    every call on the verified TLS channel succeeds (no error counted)."""
    a = host("hostA", full(pki), vms=("vm1",))
    b = host("hostB", full(pki), vms=("vm1",))
    wait(lambda: a.sync.lease and b.sync.lease and a.sync.streaming and b.sync.streaming)
    interest = b.sync.interest
    assert interest is not None
    events = interest.events
    a.sync.publish(FleetRecord("vm1", "hostA", state="blocked", since=time.time(),
                               until=time.time() + 3600, reason="spam"))
    got = b.has("vm1", state="blocked")
    assert got.host == "hostA" and got.reason == "spam"
    assert interest.events > events  # it came on the watch, not a read
    arrived = b.sync.fetch("vm1", 2.0)
    assert arrived is not None and arrived.state == "blocked" and arrived.host == "hostA"

    b.sync.publish(FleetRecord("vm1", "hostB", state="ok", since=time.time(),
                               actor="operator:root", reason="ticket 42"))
    released = a.has("vm1", state="ok")
    assert released.host == "hostB" and released.reason == "ticket 42"
    for h in (a, b):
        assert h.sync.etcd.up is True
        assert not h.sync.etcd.errors, (h.sync.host, h.sync.etcd.errors)


def test_a_host_without_a_client_certificate_never_connects(
        host: Callable[..., Host], pki: Pki, etcd: TlsEtcd) -> None:
    """etcd requires a client certificate: a host whose fleet.tls names the
    CA but no certificate of its own gets no lease and counts its failures,
    while a host with one connects to the same etcd at the same time."""
    mark = len(etcd.log())
    c = host("hostC", FleetTls(ca=str(pki.ca)), vms=("vm1",))
    a = host("hostA", full(pki), vms=("vm1",))
    wait(lambda: a.sync.lease)  # etcd serves TLS clients with a certificate now
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # never up, not for a moment
        assert c.sync.lease == 0 and c.sync.etcd.up is False, c.sync.etcd.errors
        time.sleep(0.05)
    # Its first call (the record lease's grant) fails, and again at each retry:
    # fast, not a timeout. In TLS 1.3 the client's side of the handshake ends
    # before etcd checks for its certificate, so grpc sees the refusal as the
    # server's alert on the first read (BAD_CERTIFICATE, "Unwrap failed
    # (TSI_DATA_CORRUPTED)") and fails the call as UNAVAILABLE.
    assert c.sync.etcd.errors["lease"] >= 2, c.sync.etcd.errors
    # The refusal is etcd's, for the missing certificate: the channel was TLS,
    # to the right port, and the handshake itself is what failed.
    assert "client didn't provide a certificate" in etcd.log()[mark:], etcd.log()[-2000:]
    assert a.sync.etcd.up is True and not a.sync.etcd.errors, a.sync.etcd.errors
