"""The bpf(2) calls the agent needs, without bcc: pinned objects, map
elements (one by one and in batches), object info, and test runs.

The long-lived agent uses only these; bcc (and its LLVM) is loaded just to
compile, in a short-lived child (datapath/compile.py).
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

_NR_BPF = {"x86_64": 321, "aarch64": 280}[os.uname().machine]
MAP_LOOKUP_ELEM, MAP_UPDATE_ELEM, MAP_DELETE_ELEM, MAP_GET_NEXT_KEY = 1, 2, 3, 4
OBJ_PIN, OBJ_GET, PROG_TEST_RUN, OBJ_GET_INFO_BY_FD = 6, 7, 10, 15
MAP_LOOKUP_BATCH, MAP_UPDATE_BATCH = 24, 26
BPF_ANY, BPF_NOEXIST = 0, 1

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _Attr(ctypes.Union):
    _fields_ = [("raw", ctypes.c_uint8 * 128)]


def bpf(cmd: int, attr: ctypes.Structure) -> int:
    """The raw syscall; raises OSError with errno."""
    buf = _Attr()
    ctypes.memmove(ctypes.addressof(buf), ctypes.addressof(attr), ctypes.sizeof(attr))
    rc = _libc.syscall(_NR_BPF, cmd, ctypes.byref(buf), ctypes.sizeof(buf))
    err = ctypes.get_errno()
    # The kernel writes results (a batch's count) even when it fails.
    ctypes.memmove(ctypes.addressof(attr), ctypes.addressof(buf), ctypes.sizeof(attr))
    if rc < 0:
        raise OSError(err, os.strerror(err))
    return int(rc)


class _ObjAttr(ctypes.Structure):
    _fields_ = [("pathname", ctypes.c_uint64), ("bpf_fd", ctypes.c_uint32),
                ("file_flags", ctypes.c_uint32)]


def obj_get(path: str) -> int:
    """An fd for a pinned map or program."""
    p = ctypes.create_string_buffer(path.encode())
    return bpf(OBJ_GET, _ObjAttr(pathname=ctypes.addressof(p)))


def obj_pin(fd: int, path: str) -> None:
    p = ctypes.create_string_buffer(path.encode())
    bpf(OBJ_PIN, _ObjAttr(pathname=ctypes.addressof(p), bpf_fd=fd))


class InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32),
                ("info", ctypes.c_uint64)]


class RawMapInfo(ctypes.Structure):
    """struct bpf_map_info (uapi/linux/bpf.h), as far as we read it."""

    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32),
                ("key_size", ctypes.c_uint32), ("value_size", ctypes.c_uint32),
                ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32),
                ("name", ctypes.c_char * 16), ("ifindex", ctypes.c_uint32),
                ("btf_vmlinux_value_type_id", ctypes.c_uint32), ("netns_dev", ctypes.c_uint64),
                ("netns_ino", ctypes.c_uint64), ("btf_id", ctypes.c_uint32),
                ("btf_key_type_id", ctypes.c_uint32), ("btf_value_type_id", ctypes.c_uint32),
                ("_pad", ctypes.c_uint32), ("map_extra", ctypes.c_uint64),
                ("_rest", ctypes.c_uint8 * 32)]


@dataclass(frozen=True)
class MapInfo:
    type: int
    key_size: int
    value_size: int
    max_entries: int
    name: str


def raw_map_info(fd: int) -> RawMapInfo:
    info = RawMapInfo()
    bpf(OBJ_GET_INFO_BY_FD, InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info),
                                      info=ctypes.addressof(info)))
    return info


def map_info(fd: int) -> MapInfo:
    info = raw_map_info(fd)
    return MapInfo(info.type, info.key_size, info.value_size, info.max_entries,
                   info.name.decode())


class _ElemAttr(ctypes.Structure):
    _fields_ = [("map_fd", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                ("key", ctypes.c_uint64), ("value", ctypes.c_uint64),
                ("flags", ctypes.c_uint64)]


class _BatchAttr(ctypes.Structure):
    _fields_ = [("in_batch", ctypes.c_uint64), ("out_batch", ctypes.c_uint64),
                ("keys", ctypes.c_uint64), ("values", ctypes.c_uint64),
                ("count", ctypes.c_uint32), ("map_fd", ctypes.c_uint32),
                ("elem_flags", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class PinnedMap:
    """A pinned map, typed with the ctypes mirrors of bpf/smtp_common.h."""

    def __init__(self, path: str, key: type[Any], leaf: type[Any]) -> None:
        self.path = path
        self.Key = key
        self.Leaf = leaf
        self.fd = obj_get(path)
        info = map_info(self.fd)
        if (info.key_size, info.value_size) != (ctypes.sizeof(key), ctypes.sizeof(leaf)):
            os.close(self.fd)
            raise OSError(errno.EINVAL, f"{path}: key/value sizes {info.key_size}/"
                          f"{info.value_size} differ from the ctypes mirror")
        self.info = info

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _elem(self, cmd: int, key: Any, value: Any = None, flags: int = 0) -> int:
        return bpf(cmd, _ElemAttr(
            map_fd=self.fd, key=ctypes.addressof(key) if key is not None else 0,
            value=ctypes.addressof(value) if value is not None else 0, flags=flags))

    def __getitem__(self, key: Any) -> Any:
        leaf = self.Leaf()
        try:
            self._elem(MAP_LOOKUP_ELEM, key, leaf)
        except FileNotFoundError as exc:
            raise KeyError(key) from exc
        return leaf

    def __setitem__(self, key: Any, leaf: Any) -> None:
        self._elem(MAP_UPDATE_ELEM, key, leaf, BPF_ANY)

    def __delitem__(self, key: Any) -> None:
        try:
            self._elem(MAP_DELETE_ELEM, key)
        except FileNotFoundError as exc:
            raise KeyError(key) from exc

    def keys(self) -> Iterator[Any]:
        key = None
        while True:
            nxt = self.Key()
            try:
                self._elem(MAP_GET_NEXT_KEY, key, nxt)
            except FileNotFoundError:
                return
            yield nxt
            key = nxt

    def items(self, chunk: int = 4096) -> Iterator[tuple[Any, Any]]:
        """Every element, in batches of `chunk` (one syscall each)."""
        # A structure element is a view into its batch's own arrays; a scalar
        # one (c_uint32) comes out of ctypes as a plain int: wrapped again.
        wrap_k = issubclass(self.Key, ctypes._SimpleCData)
        wrap_v = issubclass(self.Leaf, ctypes._SimpleCData)
        for keys, values, n in self.batches(chunk):
            for i in range(n):
                k, v = keys[i], values[i]
                yield (self.Key(k) if wrap_k else k), (self.Leaf(v) if wrap_v else v)

    def batches(self, chunk: int = 4096) -> Iterator[tuple[Any, Any, int]]:
        """(keys array, values array, how many are filled) per batch read, each
        batch in arrays of its own: for callers that decode the raw buffers."""
        token_in = ctypes.c_uint64(0)
        token_out = ctypes.c_uint64(0)
        first = True
        while True:
            keys = (self.Key * chunk)()
            values = (self.Leaf * chunk)()
            attr = _BatchAttr(
                in_batch=0 if first else ctypes.addressof(token_in),
                out_batch=ctypes.addressof(token_out), keys=ctypes.addressof(keys),
                values=ctypes.addressof(values), count=chunk, map_fd=self.fd)
            done = False
            try:
                bpf(MAP_LOOKUP_BATCH, attr)
            except FileNotFoundError:
                done = True  # the last batch; attr.count still tells its size
            n = attr.count
            if n:
                yield keys, values, n
            if done or n == 0:
                return
            token_in.value = token_out.value
            first = False

    def update_batch(self, keys: Any, values: Any) -> None:
        bpf(MAP_UPDATE_BATCH, _BatchAttr(keys=ctypes.addressof(keys),
                                         values=ctypes.addressof(values),
                                         count=len(keys), map_fd=self.fd))

    def clear(self) -> None:
        for k in list(self.keys()):
            try:
                del self[k]
            except KeyError:
                pass

    def __len__(self) -> int:
        return sum(1 for _ in self.keys())
