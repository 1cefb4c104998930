"""etcd's gRPC API for the fleet (aetcd, on grpcio): many watches
multiplexed on one stream (a host watches each of its VMs' keys and its
tenants' prefixes; the JSON gateway would open an HTTP stream per watch), the
reads that start them, and the writes and lease keepalives (on one long-lived
stream), with the same calls as etcd.py's gateway client: a request on the
gateway costs etcd about twice the CPU (HTTP and JSON in front of the same
gRPC call), a keepalive about five times (a stream opened per call).
aetcd is asyncio; the fleet is threads: one event loop thread per process
runs every client's coroutines, and the calls here wait for them. Every
failure is EtcdError (EtcdCompacted for a compacted start revision).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar
from urllib.parse import urlsplit

from smtpguard.fleet.etcd import EtcdCompacted, EtcdError, Kv, prefix_end
from smtpguard.policy.model import Fleet as FleetPolicy

T = TypeVar("T")
# A partition shows within ~15 s (gRPC's own keepalive; etcd accepts a ping
# every 5 s at the least, --grpc-keepalive-min-time). A lost connection is
# tried again at most a second apart: gRPC's own backoff grows to 2 min, so
# after a minute's outage the channel stayed away for another 15 to 40 s
# after etcd was back, and a VM arriving then was not read (a refused
# connection costs etcd nothing; a fleet reconnects within a second of it).
CHANNEL = {"grpc.keepalive_time_ms": 10_000, "grpc.keepalive_timeout_ms": 5_000,
           "grpc.keepalive_permit_without_calls": 1,
           "grpc.initial_reconnect_backoff_ms": 500, "grpc.min_reconnect_backoff_ms": 500,
           "grpc.max_reconnect_backoff_ms": 1_000}

_loop: asyncio.AbstractEventLoop | None = None
_loop_lock = threading.Lock()


def _shared_loop() -> asyncio.AbstractEventLoop:
    """The process's one event loop for etcd's gRPC clients, on its thread."""
    global _loop
    with _loop_lock:
        if _loop is None:
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="fleet-grpc", daemon=True).start()
            _loop = loop
        return _loop


def _client_class() -> Any:
    """aetcd's Client, opening a TLS channel when the policy gives one (aetcd
    itself only opens plain ones)."""
    import aetcd
    import grpc
    from aetcd import rpc, watcher

    class Client(aetcd.Client):  # type: ignore[misc]
        creds: Any = None

        async def connect(self) -> None:
            if self.creds is None:
                return await super().connect()  # type: ignore[no-any-return]
            if self._connected.is_set():
                return None
            target = f"{self._host}:{self._port}"
            self.channel = grpc.aio.secure_channel(target, self.creds,
                                                   options=list(self._options.items()))
            self.kvstub = rpc.KVStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self._watcher = watcher.Watcher(rpc.WatchStub(self.channel),
                                            timeout=self._timeout, metadata=self.metadata)
            self._connected.set()
            return None

    return Client


class GrpcEtcd:
    """One etcd client on the gRPC API (one channel): reads, writes, leases,
    and watches on one stream."""

    def __init__(self, cfg: FleetPolicy) -> None:
        self.cfg = cfg
        self.loop = _shared_loop()
        self.current = 0
        self.up = False
        self.errors: Counter[str] = Counter()  # failed calls, by operation
        self._client: Any = None
        self._keepalive: Any = None  # (client, its LeaseKeepAlive call, lock)

    def _new_client(self) -> Any:
        url = urlsplit(self.cfg.endpoints[self.current % len(self.cfg.endpoints)])
        client = _client_class()(host=url.hostname or "localhost", port=url.port or 2379,
                                 timeout=self.cfg.timeout, options=CHANNEL)
        tls = self.cfg.tls
        if url.scheme == "https" or tls is not None:
            import grpc

            def read(p: str | None) -> bytes | None:
                if p is None:
                    return None
                with open(p, "rb") as f:
                    return f.read()

            client.creds = grpc.ssl_channel_credentials(
                read(tls.ca if tls else None), read(tls.key if tls else None),
                read(tls.cert if tls else None))
        return client

    def _call(self, make: Callable[[Any], Coroutine[Any, Any, T]], what: str,
              timeout: float | None = None) -> T:
        async def run() -> T:
            if self._client is None:
                self._client = self._new_client()
            await self._client.connect()
            return await make(self._client)

        fut = asyncio.run_coroutine_threadsafe(run(), self.loop)
        try:
            result = fut.result(timeout if timeout is not None else self.cfg.timeout + 1)
        except EtcdError:
            self.up = False
            self.errors[what] += 1
            raise
        except concurrent.futures.TimeoutError as exc:
            fut.cancel()
            self.up = False
            self.errors[what] += 1
            raise EtcdError(f"etcd {what}: timed out") from exc
        except Exception as exc:  # aetcd's and grpc's own, alike
            self.up = False
            self.errors[what] += 1
            self._rotate()
            raise EtcdError(f"etcd {what}: {_detail(exc)}") from exc
        self.up = True
        return result

    def _rotate(self) -> None:
        """The next endpoint for the next call (this one failed)."""
        if len(self.cfg.endpoints) > 1:
            old, self._client = self._client, None
            self.current += 1
            if old is not None:
                asyncio.run_coroutine_threadsafe(old.close(), self.loop)

    def read(self, key: str, prefix: bool = False, timeout: float | None = None,
             wait: bool = False) -> tuple[int, list[Kv]]:
        """(the store's revision, the key, or every key under the prefix).
        wait: while the channel is reconnecting, wait for it (within the
        timeout) rather than fail at once."""
        from aetcd import rpc

        end = prefix_end(key).encode() if prefix else key.encode() + b"\0"
        deadline = timeout if timeout is not None else self.cfg.timeout

        async def go(c: Any) -> tuple[int, list[Kv]]:
            r = await c.kvstub.Range(rpc.RangeRequest(key=key.encode(), range_end=end),
                                     timeout=deadline, wait_for_ready=wait)
            return int(r.header.revision), [_kv(kv) for kv in r.kvs]

        return self._call(go, "read", timeout)

    def range(self, prefix: str, min_mod_revision: int = 0) -> tuple[int, list[Kv]]:
        """(the store's revision, every key under prefix changed after
        min_mod_revision), as etcd.Etcd.range."""
        from aetcd import rpc

        async def go(c: Any) -> tuple[int, list[Kv]]:
            r = await c.kvstub.Range(rpc.RangeRequest(
                key=prefix.encode(), range_end=prefix_end(prefix).encode(),
                min_mod_revision=min_mod_revision), timeout=self.cfg.timeout)
            return int(r.header.revision), [_kv(kv) for kv in r.kvs]

        return self._call(go, "range")

    def put_if(self, key: str, value: str, lease: int, mod_revision: int
               ) -> tuple[bool, int, Kv | None]:
        """Put only if the key's mod_revision is still `mod_revision` (0: the
        key is absent). (done, the revision after, the key as it is if not)."""
        from aetcd import rpc

        k = key.encode()

        async def go(c: Any) -> tuple[bool, int, Kv | None]:
            r = await c.kvstub.Txn(rpc.TxnRequest(
                compare=[rpc.Compare(key=k, result=rpc.Compare.EQUAL, target=rpc.Compare.MOD,
                                     mod_revision=mod_revision)],
                success=[rpc.RequestOp(request_put=rpc.PutRequest(
                    key=k, value=value.encode(), lease=lease))],
                failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=k))]),
                timeout=self.cfg.timeout)
            rev = int(r.header.revision)
            if r.succeeded:
                return True, rev, None
            kvs = r.responses[0].response_range.kvs
            return False, rev, (_kv(kvs[0]) if kvs else None)

        return self._call(go, "put")

    def put(self, key: str, value: str, lease: int = 0) -> int:
        from aetcd import rpc

        async def go(c: Any) -> int:
            r = await c.kvstub.Put(rpc.PutRequest(key=key.encode(), value=value.encode(),
                                                  lease=lease), timeout=self.cfg.timeout)
            return int(r.header.revision)

        return self._call(go, "put")

    def grant(self, ttl: float) -> int:
        from aetcd import rpc

        async def go(c: Any) -> int:
            r = await c.leasestub.LeaseGrant(rpc.LeaseGrantRequest(TTL=max(int(ttl), 1)),
                                             timeout=self.cfg.timeout)
            if r.error:
                raise EtcdError(f"etcd lease: {r.error}")
            return int(r.ID)

        return self._call(go, "lease")

    def keepalive(self, lease: int) -> bool:
        """False when the lease is gone (expired while we could not reach
        etcd). On one LeaseKeepAlive stream, opened at the first call and
        again after a failure."""
        from aetcd import rpc

        async def go(c: Any) -> bool:
            if self._keepalive is None or self._keepalive[0] is not c:
                queue: asyncio.Queue[Any] = asyncio.Queue()

                async def requests() -> Any:
                    while True:
                        yield await queue.get()

                self._keepalive = (c, c.leasestub.LeaseKeepAlive(requests()), queue,
                                   asyncio.Lock())
            _, call, queue, lock = self._keepalive
            async with lock:
                try:
                    queue.put_nowait(rpc.LeaseKeepAliveRequest(ID=lease))
                    while True:
                        r = await asyncio.wait_for(call.read(), self.cfg.timeout)
                        if r is grpc_eof():
                            raise EtcdError("etcd lease: the keepalive stream ended")
                        if int(r.ID) == lease:
                            return int(r.TTL) > 0
                except BaseException:
                    call.cancel()
                    self._keepalive = None
                    raise

        return self._call(go, "lease")

    def close_watches(self) -> None:
        """Nothing: the watches end with close() (etcd.Etcd's streams need this)."""

    def watch(self, key: str, prefix: bool, start_revision: int,
              on_event: Callable[[str, Kv], None],
              on_end: Callable[[EtcdError], None]) -> Any:
        """Every change to the key (or under the prefix) from start_revision
        on, on the client's one stream: on_event(PUT or DELETE, kv) on the loop's
        thread, then on_end once the watch ends (EtcdCompacted when its start
        revision is gone; the stream's failure; not called when cancelled).
        Returns a handle for cancel()."""
        from aetcd.exceptions import RevisionCompactedError

        async def go(c: Any) -> Any:
            end = prefix_end(key).encode() if prefix else None
            w = await c.watch(key.encode(), range_end=end, start_revision=start_revision)

            async def pump() -> None:
                try:
                    async for ev in w:
                        on_event(str(ev.kind), _kv(ev.kv))
                except RevisionCompactedError as exc:
                    on_end(EtcdCompacted(int(exc.compacted_revision)))
                    return
                except asyncio.CancelledError:
                    return
                except Exception as exc:
                    on_end(EtcdError(f"etcd watch ended: {exc!r}"))
                    return
                if not cancelled.is_set():
                    on_end(EtcdError("etcd watch: the stream ended"))

            cancelled = asyncio.Event()
            task = asyncio.get_running_loop().create_task(pump())
            return (w, task, cancelled)

        return self._call(go, "watch")

    def cancel(self, handle: Any) -> None:
        w, task, cancelled = handle

        async def go(_c: Any) -> None:
            cancelled.set()
            try:
                await w.cancel()
            finally:
                task.cancel()

        try:
            self._call(go, "cancel")
        except EtcdError:
            pass  # the stream is gone already, and the watch with it

    def close(self) -> None:
        """End the streams and the channel (every watch ends, on_end not called
        for those cancelled first)."""
        client, self._client = self._client, None
        self._keepalive = None
        if client is not None:
            fut = asyncio.run_coroutine_threadsafe(client.close(), self.loop)
            try:
                fut.result(5)
            except Exception:
                fut.cancel()


def grpc_eof() -> Any:
    import grpc

    return grpc.aio.EOF


def _detail(exc: Exception) -> str:
    """grpc's error as one line (its repr spans several)."""
    details = getattr(exc, "details", None)
    code = getattr(exc, "code", None)
    if callable(details) and callable(code):
        return f"{code().name}: {details()}"
    return repr(exc)


def _kv(kv: Any) -> Kv:
    return Kv(bytes(kv.key).decode(), bytes(kv.value), int(kv.mod_revision), int(kv.lease))
