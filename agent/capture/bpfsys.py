"""The few bpf(2) commands bcc 0.26 does not wrap: tcx and netns links, pins, queries, sockmap updates, stats.

Layouts follow include/uapi/linux/bpf.h (kernel >= 6.6 for tcx). Every function raises OSError with the
kernel's errno on failure.
"""

from __future__ import annotations

import ctypes
import os
import struct
from dataclasses import dataclass

_libc = ctypes.CDLL(None, use_errno=True)
_SYS_BPF = 321  # x86_64
_ATTR_SIZE = 144

# commands
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_GET_NEXT_ID = 11
BPF_MAP_GET_NEXT_ID = 12
BPF_PROG_GET_FD_BY_ID = 13
BPF_MAP_GET_FD_BY_ID = 14
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_QUERY = 16
BPF_LINK_CREATE = 28
BPF_LINK_UPDATE = 29
BPF_LINK_GET_FD_BY_ID = 30
BPF_ENABLE_STATS = 32
BPF_LINK_DETACH = 34

# attach types / link types / flags
BPF_SK_LOOKUP = 36
BPF_TCX_INGRESS = 46
BPF_TCX_EGRESS = 47
BPF_LINK_TYPE_NETNS = 5
BPF_LINK_TYPE_TCX = 11
BPF_F_BEFORE = 1 << 3
BPF_STATS_RUN_TIME = 0
BPF_PROG_TYPE_SK_LOOKUP = 30

BPF_FS_MAGIC = 0xCAFE4A11


def _bpf(cmd: int, attr: bytes) -> int:
    buf = ctypes.create_string_buffer(attr.ljust(_ATTR_SIZE, b"\0"), _ATTR_SIZE)
    ret = int(_libc.syscall(_SYS_BPF, cmd, buf, _ATTR_SIZE))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf(cmd={cmd}): {os.strerror(err)}")
    return ret


def _ptr(buf: ctypes.Array[ctypes.c_char]) -> int:
    return ctypes.addressof(buf)


def map_update(map_fd: int, key: bytes, value: bytes, flags: int = 0) -> None:
    """BPF_MAP_UPDATE_ELEM (works for sockmaps, where value is a socket fd)."""
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value, len(value))
    _bpf(BPF_MAP_UPDATE_ELEM, struct.pack("=IIQQQ", map_fd, 0, _ptr(k), _ptr(v), flags))


def map_delete(map_fd: int, key: bytes) -> None:
    """BPF_MAP_DELETE_ELEM."""
    k = ctypes.create_string_buffer(key, len(key))
    _bpf(BPF_MAP_DELETE_ELEM, struct.pack("=IIQ", map_fd, 0, _ptr(k)))


def map_lookup(map_fd: int, key: bytes, value_size: int) -> bytes | None:
    """BPF_MAP_LOOKUP_ELEM; None when the key is absent."""
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value_size)
    try:
        _bpf(BPF_MAP_LOOKUP_ELEM, struct.pack("=IIQQQ", map_fd, 0, _ptr(k), _ptr(v), 0))
    except FileNotFoundError:
        return None
    return v.raw


def map_next_key(map_fd: int, key: bytes | None, key_size: int) -> bytes | None:
    """BPF_MAP_GET_NEXT_KEY: the key after ``key`` (the first with None); None at the end."""
    nxt = ctypes.create_string_buffer(key_size)
    k = ctypes.create_string_buffer(key, len(key)) if key is not None else None
    try:
        _bpf(BPF_MAP_GET_NEXT_KEY, struct.pack("=IIQQ", map_fd, 0, _ptr(k) if k is not None else 0, _ptr(nxt)))
    except FileNotFoundError:
        return None
    return nxt.raw


@dataclass(frozen=True)
class MapInfo:
    """The fields of struct bpf_map_info we use."""

    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    name: str


def map_info(map_fd: int) -> MapInfo:
    """BPF_OBJ_GET_INFO_BY_FD on a map."""
    raw = _info(map_fd, 88)
    typ, mid, key_size, value_size, max_entries, _flags = struct.unpack_from("=IIIIII", raw, 0)
    name = raw[24:40].split(b"\0", 1)[0].decode(errors="replace")
    return MapInfo(typ, mid, key_size, value_size, max_entries, name)


def obj_pin(fd: int, path: str) -> None:
    """Pin a map, program or link in a bpffs."""
    p = ctypes.create_string_buffer(path.encode())
    _bpf(BPF_OBJ_PIN, struct.pack("=QII", _ptr(p), fd, 0))


def obj_get(path: str) -> int:
    """Open a pinned object; returns a new fd."""
    p = ctypes.create_string_buffer(path.encode())
    return _bpf(BPF_OBJ_GET, struct.pack("=QII", _ptr(p), 0, 0))


def link_create_tcx(prog_fd: int, ifindex: int, attach_type: int = BPF_TCX_INGRESS, first: bool = True) -> int:
    """Attach a SCHED_CLS program to an interface through a tcx link (first in the chain by default)."""
    flags = BPF_F_BEFORE if first else 0
    return _bpf(BPF_LINK_CREATE, struct.pack("=IIIIIIQ", prog_fd, ifindex, attach_type, flags, 0, 0, 0))


def link_create_netns(prog_fd: int, netns_fd: int, attach_type: int = BPF_SK_LOOKUP) -> int:
    """Attach a netns program (SK_LOOKUP) through a link; it lives as long as the link fd or a pin."""
    return _bpf(BPF_LINK_CREATE, struct.pack("=IIII", prog_fd, netns_fd, attach_type, 0))


def link_update(link_fd: int, new_prog_fd: int) -> None:
    """Atomically swap the program behind a link."""
    _bpf(BPF_LINK_UPDATE, struct.pack("=IIII", link_fd, new_prog_fd, 0, 0))


def link_detach(link_fd: int) -> None:
    """Detach a link from its hook now (pins and fds keep a defunct link object until closed)."""
    _bpf(BPF_LINK_DETACH, struct.pack("=I", link_fd))


def link_get_fd_by_id(link_id: int) -> int:
    """Open a link by id."""
    return _bpf(BPF_LINK_GET_FD_BY_ID, struct.pack("=I", link_id))


def prog_get_fd_by_id(prog_id: int) -> int:
    """Open a program by id."""
    return _bpf(BPF_PROG_GET_FD_BY_ID, struct.pack("=I", prog_id))


def _ids(cmd: int) -> list[int]:
    ids: list[int] = []
    current = 0
    while True:
        buf = ctypes.create_string_buffer(struct.pack("=II", current, 0).ljust(_ATTR_SIZE, b"\0"), _ATTR_SIZE)
        if _libc.syscall(_SYS_BPF, cmd, buf, _ATTR_SIZE) < 0:
            return ids  # ENOENT: no more
        current = struct.unpack_from("=I", buf.raw, 4)[0]
        ids.append(current)


def prog_ids() -> list[int]:
    """Every BPF program loaded on the machine (BPF_PROG_GET_NEXT_ID)."""
    return _ids(BPF_PROG_GET_NEXT_ID)


def map_infos() -> list[MapInfo]:
    """Every BPF map on the machine that can still be opened (one freed meanwhile is skipped)."""
    out = []
    for map_id in _ids(BPF_MAP_GET_NEXT_ID):
        try:
            fd = _bpf(BPF_MAP_GET_FD_BY_ID, struct.pack("=I", map_id))
        except OSError:
            continue
        try:
            out.append(map_info(fd))
        finally:
            os.close(fd)
    return out


def _info(fd: int, size: int) -> bytes:
    buf = ctypes.create_string_buffer(size)
    _bpf(BPF_OBJ_GET_INFO_BY_FD, struct.pack("=IIQ", fd, size, _ptr(buf)))
    return buf.raw


@dataclass(frozen=True)
class LinkInfo:
    """The fields of struct bpf_link_info we use. For tcx: target = ifindex (0 once the device is gone)."""

    type: int
    id: int
    prog_id: int
    target: int
    attach_type: int


def link_info(link_fd: int) -> LinkInfo:
    """BPF_OBJ_GET_INFO_BY_FD on a link."""
    raw = _info(link_fd, 48)
    typ, lid, prog_id, _pad, target, attach_type = struct.unpack_from("=IIIIII", raw)
    return LinkInfo(typ, lid, prog_id, target, attach_type)


@dataclass(frozen=True)
class ProgInfo:
    """The fields of struct bpf_prog_info we use (run_time_ns/run_cnt need BPF_ENABLE_STATS)."""

    type: int
    id: int
    name: str
    run_time_ns: int
    run_cnt: int


def prog_info(prog_fd: int) -> ProgInfo:
    """BPF_OBJ_GET_INFO_BY_FD on a program."""
    raw = _info(prog_fd, 232)
    typ, pid = struct.unpack_from("=II", raw, 0)
    name = raw[64:80].split(b"\0", 1)[0].decode(errors="replace")
    run_time_ns, run_cnt = struct.unpack_from("=QQ", raw, 192)
    return ProgInfo(typ, pid, name, run_time_ns, run_cnt)


def prog_info_by_id(prog_id: int) -> ProgInfo:
    """Program info by id."""
    fd = prog_get_fd_by_id(prog_id)
    try:
        return prog_info(fd)
    finally:
        os.close(fd)


def tcx_query(ifindex: int, attach_type: int = BPF_TCX_INGRESS, max_progs: int = 64) -> list[tuple[int, int]]:
    """(prog_id, link_id) of every program in an interface's tcx chain, in run order (link_id 0: no link)."""
    progs = (ctypes.c_uint32 * max_progs)()
    links = (ctypes.c_uint32 * max_progs)()
    attr = struct.pack(
        "=IIIIQIIQQQQ",
        ifindex, attach_type, 0, 0, ctypes.addressof(progs), max_progs, 0, 0, ctypes.addressof(links), 0, 0,
    )  # fmt: skip
    buf = ctypes.create_string_buffer(attr.ljust(_ATTR_SIZE, b"\0"), _ATTR_SIZE)
    if _libc.syscall(_SYS_BPF, BPF_PROG_QUERY, buf, _ATTR_SIZE) < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf(PROG_QUERY): {os.strerror(err)}")
    count = struct.unpack_from("=I", buf.raw, 24)[0]
    return [(progs[i], links[i]) for i in range(min(count, max_progs))]


def enable_stats() -> int:
    """Turn on per-program run time accounting while the returned fd stays open."""
    return _bpf(BPF_ENABLE_STATS, struct.pack("=I", BPF_STATS_RUN_TIME))


def is_bpffs(path: str) -> bool:
    """True if `path` is the root or inside of a mounted bpf filesystem."""
    buf = ctypes.create_string_buffer(120)  # struct statfs
    if _libc.statfs(path.encode(), buf) != 0:
        return False
    return bool(struct.unpack_from("=q", buf.raw, 0)[0] == BPF_FS_MAGIC)
