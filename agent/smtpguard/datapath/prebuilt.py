"""The compiled classifier kept on disk and loaded without bcc.

After a compile, the child stores each program's instructions (bcc's
dump_func) and, for every map load in them (ld_imm64 with
BPF_PSEUDO_MAP_FD), which map it means. A later start whose build key
matches (a first start after boot: bpffs is empty, the state dir is not)
creates or adopts the maps and loads the programs with bpf(2): no child, no
LLVM, no headers. The kernel's verifier still checks every load.

Never trusted blindly: a file not owned by us or writable by others, a
checksum or key mismatch (sources, flags, kernel release and build, the
headers, bcc) or a load the kernel refuses is a CacheMiss, and the caller
compiles as before. Files are written atomically (rename), 0600.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import hashlib
import importlib.util
import json
import os
import struct
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from smtpguard.datapath.bpfsys import (
    OBJ_GET_INFO_BY_FD,
    InfoAttr,
    RawMapInfo,
    bpf,
    obj_get,
    obj_pin,
    raw_map_info,
)

FORMAT = 1
MAP_CREATE, PROG_LOAD, BTF_LOAD, BTF_GET_FD_BY_ID = 0, 5, 18, 19
SCHED_CLS = 3
LD_IMM64 = 0x18  # BPF_LD | BPF_IMM | BPF_DW: two instruction slots
CALL = 0x85
PSEUDO_MAP_FD = 1
_INSN = struct.Struct("<BBhi")  # code, dst:4/src:4, off, imm
# A failed load is retried once with the verifier's log, for its last lines.
LOG_SIZE = 1 << 20


class CacheMiss(Exception):
    """The stored build cannot be used; the reason says why (then compile)."""


@dataclass(frozen=True)
class MapSpec:
    """How to create one map the programs refer to (as bcc created it)."""

    name: str
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    pinned: bool  # PIN_DIR/<name>; others (per-CPU scratch) are made per load
    # Type ids in the stored BTF (bpftool's formatted dumps need them), 0: none.
    btf_key_type_id: int = 0
    btf_value_type_id: int = 0

    def shape(self) -> tuple[int, int, int, int, int]:
        return (self.type, self.key_size, self.value_size, self.max_entries, self.flags)


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


class _BtfInfo(ctypes.Structure):
    _fields_ = [("btf", ctypes.c_uint64), ("btf_size", ctypes.c_uint32),
                ("id", ctypes.c_uint32), ("name", ctypes.c_uint64),
                ("name_len", ctypes.c_uint32), ("kernel_btf", ctypes.c_uint32)]


class _GetIdAttr(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint32), ("next_id", ctypes.c_uint32),
                ("open_flags", ctypes.c_uint32)]


class _BtfLoadAttr(ctypes.Structure):
    _fields_ = [("btf", ctypes.c_uint64), ("btf_log_buf", ctypes.c_uint64),
                ("btf_size", ctypes.c_uint32), ("btf_log_size", ctypes.c_uint32),
                ("btf_log_level", ctypes.c_uint32)]


def _spec(name: str, info: RawMapInfo, pinned: bool, btf: bool = False) -> MapSpec:
    return MapSpec(name, info.type, info.key_size, info.value_size, info.max_entries,
                   info.map_flags, pinned, info.btf_key_type_id if btf else 0,
                   info.btf_value_type_id if btf else 0)


def _btf_blob(btf_id: int) -> bytes:
    """The raw BTF (types and strings) of a loaded object, as bcc loaded it."""
    fd = bpf(BTF_GET_FD_BY_ID, _GetIdAttr(id=btf_id))
    try:
        info = _BtfInfo()
        bpf(OBJ_GET_INFO_BY_FD, InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info),
                                          info=ctypes.addressof(info)))
        buf = ctypes.create_string_buffer(info.btf_size)
        info = _BtfInfo(btf=ctypes.addressof(buf), btf_size=len(buf))
        bpf(OBJ_GET_INFO_BY_FD, InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info),
                                          info=ctypes.addressof(info)))
        return buf.raw[:info.btf_size]
    finally:
        os.close(fd)


# -- the key ---------------------------------------------------------------

def _file_digest(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return "-"


def _bcc_version() -> str:
    """bcc's version without importing it (that loads LLVM)."""
    spec = importlib.util.find_spec("bcc")
    if spec is None or not spec.submodule_search_locations:
        return "-"
    return _file_digest(Path(next(iter(spec.submodule_search_locations))) / "version.py")


def cache_key(bpf_dir: Path, flags: list[str],
              modules: Path = Path("/lib/modules")) -> dict[str, str]:
    """Everything that changes the bytecode. PIN_DIR is left out: it only names
    where bcc pins maps, which the stored build records by name."""
    uts = os.uname()
    h = hashlib.sha256()
    for f in sorted(bpf_dir.glob("*.[ch]")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    build = modules / uts.release / "build"
    headers = []
    for sub in ("build", "source"):
        p = modules / uts.release / sub
        headers.append(os.path.realpath(p) if p.exists() else "-")
    for rel in ("include/generated/autoconf.h", "include/generated/utsrelease.h",
                "include/config/kernel.release"):
        headers.append(_file_digest(build / rel))
    return {
        "format": str(FORMAT),
        "sources": h.hexdigest(),
        "cflags": "\0".join(f for f in flags if not f.startswith("-DPIN_DIR=")),
        "kernel": f"{uts.release} {uts.version} {uts.machine}",
        "headers": "\0".join(headers),
        "bcc": _bcc_version(),
    }


def cache_path(cache_dir: Path, key: dict[str, str]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return cache_dir / f"classifier-{digest[:16]}.json"


# -- storing (in the compiling child) -----------------------------------------

def _map_refs(raw: bytes) -> list[tuple[int, int]]:
    """(instruction index, map fd) of every map load; CacheMiss for anything
    else a plain byte copy could not reproduce (map values, BTF ids, kfuncs)."""
    refs = []
    n = len(raw) // _INSN.size
    i = 0
    while i < n:
        code, regs, _off, imm = _INSN.unpack_from(raw, i * _INSN.size)
        src = regs >> 4
        if code == LD_IMM64:
            if src == PSEUDO_MAP_FD:
                refs.append((i, imm))
            elif src != 0:
                raise CacheMiss(f"instruction {i}: ld_imm64 with src_reg {src}")
            i += 2
            continue
        if code == CALL and src not in (0, 1):  # helpers and bpf-to-bpf calls only
            raise CacheMiss(f"instruction {i}: call with src_reg {src}")
        i += 1
    return refs


def _pinned_id(path: Path) -> int:
    """The id of the map pinned at path, 0 if none."""
    try:
        fd = obj_get(str(path))
    except OSError:
        return 0
    try:
        return int(raw_map_info(fd).id)
    finally:
        os.close(fd)


def dump(b: Any, programs: tuple[str, ...], pin_dir: Path) -> dict[str, Any]:
    """The record of a bcc BPF object whose programs are loaded."""
    from bcc import lib  # only in the compiling child

    maps: dict[str, MapSpec] = {}
    by_fd: dict[int, str] = {}
    btf_ids: set[int] = set()
    progs = {}
    for prog in programs:
        raw = bytes(b.dump_func(prog.encode()))
        relocs = []
        for idx, fd in _map_refs(raw):
            if fd not in by_fd:
                info = raw_map_info(fd)
                name = info.name.decode()
                if name in maps:
                    raise CacheMiss(f"two maps named {name}")
                pinned = _pinned_id(pin_dir / name) == info.id
                maps[name] = _spec(name, info, pinned, btf=True)
                if info.btf_id:  # a ring buffer has none
                    btf_ids.add(info.btf_id)
                by_fd[fd] = name
            relocs.append([idx, by_fd[fd]])
        progs[prog] = {"insns": base64.b64encode(raw).decode(), "maps": relocs}
    license = lib.bpf_module_license(b.module)
    btf = None
    if len(btf_ids) == 1:  # one module, one BTF
        btf = base64.b64encode(_btf_blob(btf_ids.pop())).decode()
    else:  # no types to refer to: plain maps
        maps = {n: _spec(n, raw_map_info(fd), maps[n].pinned) for fd, n in by_fd.items()}
    return {"license": license.decode() if license else "GPL", "btf": btf,
            "maps": [asdict(m) for m in maps.values()], "programs": progs}


def _checksum(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def store(path: Path, key: dict[str, str], record: dict[str, Any]) -> None:
    """Write atomically (a reader sees the old file or the whole new one);
    older builds in the same directory go."""
    # Every directory made here is 0700: this may run before the agent makes
    # its state dir (which it would then find, and keep, as created).
    for d in reversed([d for d in (path.parent, *path.parent.parents) if not d.exists()]):
        d.mkdir(mode=0o700, exist_ok=True)
    body = {"key": key, **record}
    text = json.dumps({"checksum": _checksum(body), **body}, sort_keys=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".classifier-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    for old in path.parent.glob("classifier-*.json"):
        if old != path:
            with contextlib.suppress(FileNotFoundError):
                old.unlink()


# -- loading (in the agent) ---------------------------------------------------

def read(path: Path, key: dict[str, str]) -> dict[str, Any]:
    """The stored record for this key, or CacheMiss saying why not."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError as exc:
        raise CacheMiss("no stored build for this key") from exc
    except OSError as exc:
        raise CacheMiss(f"opening {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise CacheMiss(f"{path}: not ours or writable by others")
        data = f.read()
    try:
        doc = json.loads(data)
        checksum = doc.pop("checksum")
    except (ValueError, AttributeError, KeyError) as exc:
        raise CacheMiss(f"{path}: unreadable ({exc.__class__.__name__})") from exc
    if checksum != _checksum(doc):
        raise CacheMiss(f"{path}: checksum mismatch")
    if doc.get("key") != key:
        raise CacheMiss(f"{path}: built for another key")
    return dict(doc)


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
                if _spec(spec.name, raw_map_info(fd), True).shape() != spec.shape():
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
        prog_type=SCHED_CLS, insn_cnt=len(insns) // _INSN.size, insns=ctypes.addressof(buf),
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
            if not insns or len(insns) % _INSN.size:
                raise CacheMiss(f"{prog}: {len(insns)} bytes of instructions")
            for idx, name in relocs:
                fits = 0 <= idx < len(insns) // _INSN.size - 1 and name in fds
                code, regs, off, _imm = _INSN.unpack_from(insns, idx * _INSN.size if fits else 0)
                if not fits or code != LD_IMM64 or regs >> 4 != PSEUDO_MAP_FD:
                    raise CacheMiss(f"{prog}: relocation at {idx} does not fit")
                _INSN.pack_into(insns, idx * _INSN.size, code, regs, off, fds[name])
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
