"""Load the stored classifier (prebuilt.py's record) with bpf(2): its maps
adopted from the pin directory when their shape matches, else created (and
pinned); each map load's fd written into the instructions; each program
loaded. The kernel's verifier checks every load; a record that does not fit
or a load the kernel refuses is a CacheMiss, and the caller compiles."""

from __future__ import annotations

import base64
import contextlib
import ctypes
import os
from pathlib import Path
from typing import Any

from smtpguard.datapath.bpfsys import bpf, obj_get, obj_pin, raw_map_info
from smtpguard.datapath.prebuilt import INSN, LD_IMM64, PSEUDO_MAP_FD, CacheMiss, MapSpec, map_spec

MAP_CREATE, PROG_LOAD, BTF_LOAD = 0, 5, 18
SCHED_CLS = 3
# A failed load is retried once with the verifier's log, for its last lines.
LOG_SIZE = 1 << 20


class _MapCreateAttr(ctypes.Structure):
    _fields_ = [("map_type", ctypes.c_uint32), ("key_size", ctypes.c_uint32),
                ("value_size", ctypes.c_uint32), ("max_entries", ctypes.c_uint32),
                ("map_flags", ctypes.c_uint32), ("inner_map_fd", ctypes.c_uint32),
                ("numa_node", ctypes.c_uint32), ("map_name", ctypes.c_char * 16),
                ("map_ifindex", ctypes.c_uint32), ("btf_fd", ctypes.c_uint32),
                ("btf_key_type_id", ctypes.c_uint32), ("btf_value_type_id", ctypes.c_uint32)]


class _ProgLoadAttr(ctypes.Structure):
    _fields_ = [("prog_type", ctypes.c_uint32), ("insn_cnt", ctypes.c_uint32),
                ("insns", ctypes.c_uint64), ("license", ctypes.c_uint64),
                ("log_level", ctypes.c_uint32), ("log_size", ctypes.c_uint32),
                ("log_buf", ctypes.c_uint64), ("kern_version", ctypes.c_uint32),
                ("prog_flags", ctypes.c_uint32), ("prog_name", ctypes.c_char * 16)]


class _BtfLoadAttr(ctypes.Structure):
    _fields_ = [("btf", ctypes.c_uint64), ("btf_log_buf", ctypes.c_uint64),
                ("btf_size", ctypes.c_uint32), ("btf_log_size", ctypes.c_uint32),
                ("btf_log_level", ctypes.c_uint32)]


def _create(spec: MapSpec, btf_fd: int) -> int:
    typed = btf_fd >= 0 and spec.btf_value_type_id
    return bpf(MAP_CREATE, _MapCreateAttr(
        map_type=spec.type, key_size=spec.key_size, value_size=spec.value_size,
        max_entries=spec.max_entries, map_flags=spec.flags,
        map_name=spec.name.encode()[:15], btf_fd=btf_fd if typed else 0,
        btf_key_type_id=spec.btf_key_type_id if typed else 0,
        btf_value_type_id=spec.btf_value_type_id if typed else 0))


def _load_btf(blob: bytes) -> int:
    buf = ctypes.create_string_buffer(blob, len(blob))
    return bpf(BTF_LOAD, _BtfLoadAttr(btf=ctypes.addressof(buf), btf_size=len(blob)))


def _open_maps(specs: list[MapSpec], pin_dir: Path, btf: bytes | None) -> dict[str, int]:
    """Adopt pinned maps of the same shape, create (and pin) the missing."""
    fds: dict[str, int] = {}
    btf_fd = -1
    try:
        for spec in specs:
            path = pin_dir / spec.name
            if spec.pinned and path.exists():
                fd = obj_get(str(path))
                fds[spec.name] = fd
                if map_spec(spec.name, raw_map_info(fd), True).shape() != spec.shape():
                    raise CacheMiss(f"pinned map {spec.name} has another shape")
                continue
            if btf is not None and btf_fd < 0:
                btf_fd = _load_btf(btf)  # the maps hold it; closed below
            fds[spec.name] = _create(spec, btf_fd)
            if spec.pinned:
                obj_pin(fds[spec.name], str(path))
    except OSError as exc:
        for fd in fds.values():
            os.close(fd)
        raise CacheMiss(f"maps: {exc}") from exc
    except CacheMiss:
        for fd in fds.values():
            os.close(fd)
        raise
    finally:
        if btf_fd >= 0:
            os.close(btf_fd)
    return fds


def _prog_load(name: str, insns: bytes, license: bytes, log_level: int = 0,
               log: Any = None) -> int:
    buf = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(license)
    return bpf(PROG_LOAD, _ProgLoadAttr(
        prog_type=SCHED_CLS, insn_cnt=len(insns) // INSN.size, insns=ctypes.addressof(buf),
        license=ctypes.addressof(lic), log_level=log_level,
        log_size=ctypes.sizeof(log) if log is not None else 0,
        log_buf=ctypes.addressof(log) if log is not None else 0,
        prog_name=name.encode()[:15]))


def load(record: dict[str, Any], programs: tuple[str, ...], pin_dir: Path) -> dict[str, int]:
    """Program fds by name, their maps created or adopted in pin_dir."""
    try:
        specs = [MapSpec(**m) for m in record["maps"]]
        license = str(record["license"]).encode()
        btf = base64.b64decode(record["btf"], validate=True) if record["btf"] else None
        stored = {p: (base64.b64decode(record["programs"][p]["insns"], validate=True),
                      [(int(i), str(m)) for i, m in record["programs"][p]["maps"]])
                  for p in programs}
    except (KeyError, TypeError, ValueError) as exc:
        raise CacheMiss(f"malformed record ({exc.__class__.__name__}: {exc})") from exc
    fds = _open_maps(specs, pin_dir, btf)
    out: dict[str, int] = {}
    try:
        for prog, (raw, relocs) in stored.items():
            insns = bytearray(raw)
            if not insns or len(insns) % INSN.size:
                raise CacheMiss(f"{prog}: {len(insns)} bytes of instructions")
            for idx, name in relocs:
                fits = 0 <= idx < len(insns) // INSN.size - 1 and name in fds
                code, regs, off, _imm = INSN.unpack_from(insns, idx * INSN.size if fits else 0)
                if not fits or code != LD_IMM64 or regs >> 4 != PSEUDO_MAP_FD:
                    raise CacheMiss(f"{prog}: relocation at {idx} does not fit")
                INSN.pack_into(insns, idx * INSN.size, code, regs, off, fds[name])
            try:
                out[prog] = _prog_load(prog, bytes(insns), license)
            except OSError as exc:
                log = ctypes.create_string_buffer(LOG_SIZE)
                with contextlib.suppress(OSError):
                    os.close(_prog_load(prog, bytes(insns), license, 1, log))
                tail = " | ".join(log.value.decode(errors="replace").strip().splitlines()[-2:])
                raise CacheMiss(f"{prog}: the kernel refused it: {exc.strerror}"
                                + (f" ({tail})" if tail else "")) from exc
    except BaseException:
        for fd in out.values():
            os.close(fd)
        raise
    finally:
        for fd in fds.values():
            os.close(fd)  # the programs hold their maps now
    return out
