"""Hostile requests on the control socket of a running agent: random JSON of
random shapes, oversized and truncated lines, connections that say nothing.
Each gets one JSON line back (or nothing, for a peer that left), the agent
keeps running and answers the next honest request; defaults listen only on
loopback and a root-only unix socket."""

from __future__ import annotations

import contextlib
import json
import random
import socket
import string
from pathlib import Path
from typing import Any

from kit import lab_with_agent, require_root, scale
from smtpguard.api.control import MAX_REQUEST
from smtpguard.defaults import DEFAULT_METRICS, DEFAULT_SOCKET

CASES = scale(2000, 200)
CMDS = ["status", "flags", "block", "throttle", "release", "reload", "history", "incidents",
        "incident", "explain", "nope", ""]


def junk(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(7) if depth < 3 else rng.randrange(5)
    if kind == 0:
        return rng.randint(-2**70, 2**70)
    if kind == 1:
        return "".join(rng.choice(string.printable) for _ in range(rng.randrange(40)))
    if kind == 2:
        return rng.random() * 1e6
    if kind == 3:
        return rng.choice([None, True, False, "vm1", "1h", "-1s", "∞"])
    if kind == 4:
        return rng.choice(["vm1", "rvm1", "../../etc", "\x00", "1e9999"])
    if kind == 5:
        return [junk(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(["vm", "for", "reason", "id", "since", "cmd", "x"]): junk(rng, 3)
            for _ in range(rng.randrange(4))}


def raw(path: Path, data: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(20)
        s.connect(str(path))
        with contextlib.suppress(OSError):
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def test_control_socket_survives_hostile_requests(tmp_path: Path) -> None:
    require_root()
    assert DEFAULT_METRICS.startswith("127.0.0.1:") and str(DEFAULT_SOCKET).startswith("/run/")
    rng = random.Random(7)
    with lab_with_agent(tmp_path, 1, enforce=True) as (lab, agent):
        answered = refused = 0
        for i in range(CASES):
            extra = junk(rng, 2)
            req = {"cmd": rng.choice(CMDS), **(extra if isinstance(extra, dict) else {})} \
                if rng.random() < 0.8 else junk(rng)
            if req == {"cmd": "reload"} or (isinstance(req, dict) and req.get("cmd") in (
                    "block", "throttle") and req.get("vm") in ("vm1", "rvm1")):
                req["vm"] = f"nobody{i}"  # honest commands are tested elsewhere
            line = json.dumps(req).encode() + b"\n"
            if rng.random() < 0.05:
                line = line[:rng.randrange(len(line))]  # cut short
            reply = json.loads(raw(agent.socket, line))
            assert isinstance(reply.get("ok"), bool)
            answered += 1
            refused += not reply["ok"]
        assert b"too large" in raw(agent.socket, b"x" * (MAX_REQUEST + 10))
        assert json.loads(raw(agent.socket, b""))["ok"] is False  # a peer that says nothing
        status: Any = agent.ctl("status", "--json")
        assert {r["vm"] for r in status} >= {"vm1"}
        assert agent.proc is not None and agent.proc.poll() is None
        print(f"\nhostile control requests: {answered} answered, {refused} refused, agent fine")
