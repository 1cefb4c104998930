"""The compiled classifier kept on disk and loaded without bcc.

After a compile, the child stores each program's instructions (bcc's
dump_func) and, for every map load in them (ld_imm64 with
BPF_PSEUDO_MAP_FD), which map it means. A later start whose build key
matches (a first start after boot: bpffs is empty, the state dir is not)
creates or adopts the maps and loads the programs with bpf(2) (progload.py):
no child, no LLVM, no headers. The kernel's verifier still checks every load.

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
    raw_map_info,
)

FORMAT = 1
BTF_GET_FD_BY_ID = 19
LD_IMM64 = 0x18  # BPF_LD | BPF_IMM | BPF_DW: two instruction slots
CALL = 0x85
PSEUDO_MAP_FD = 1
INSN = struct.Struct("<BBhi")  # code, dst:4/src:4, off, imm


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


class _BtfInfo(ctypes.Structure):
    _fields_ = [("btf", ctypes.c_uint64), ("btf_size", ctypes.c_uint32),
                ("id", ctypes.c_uint32), ("name", ctypes.c_uint64),
                ("name_len", ctypes.c_uint32), ("kernel_btf", ctypes.c_uint32)]


class _GetIdAttr(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint32), ("next_id", ctypes.c_uint32),
                ("open_flags", ctypes.c_uint32)]


def map_spec(name: str, info: RawMapInfo, pinned: bool, btf: bool = False) -> MapSpec:
    """A map's spec from the kernel's info on it (btf: its type ids too)."""
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
    n = len(raw) // INSN.size
    i = 0
    while i < n:
        code, regs, _off, imm = INSN.unpack_from(raw, i * INSN.size)
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
                maps[name] = map_spec(name, info, pinned, btf=True)
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
        maps = {n: map_spec(n, raw_map_info(fd), maps[n].pinned) for fd, n in by_fd.items()}
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


# -- reading (in the agent; progload.py loads the record) ---------------------

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
