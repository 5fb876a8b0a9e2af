"""Netlink: messages and attributes as bytes (pure functions), and one socket that sends a request and
collects its answer (`NetlinkSocket`). rtnetlink (`rtnl`) and ctnetlink (`ctnetlink`) build on it.

Three kinds of request, as ``ip`` and ``tc`` send them:
  - a get (``NLM_F_REQUEST``): the kernel answers with one message or an error;
  - a dump (``NLM_F_DUMP``): messages until ``NLMSG_DONE``, which carries the error of a failed dump;
  - a change (``NLM_F_ACK``): the kernel answers with an ``NLMSG_ERROR`` of 0 (the ACK) or -errno.
Every failure is an OSError whose message names the request (``what``) and the kernel's errno, plus the
kernel's own explanation where it gives one (extended ACK); a malformed answer is an OSError EPROTO naming the
request; no answer within the socket's timeout is a TimeoutError naming it. Nothing waits forever.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import time
from collections.abc import Callable, Iterable
from typing import NamedTuple, Self, TypeVar

T = TypeVar("T")

NLMSG_NOOP, NLMSG_ERROR, NLMSG_DONE = 1, 2, 3
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK, NLM_F_DUMP_INTR = 0x1, 0x2, 0x4, 0x10
NLM_F_DUMP = 0x300
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x100, 0x200, 0x400
NLM_F_ACK_TLVS = 0x200  # on an NLMSG_ERROR: extended-ACK attributes follow the echoed header
NLMSGERR_ATTR_MSG = 1
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF
SOL_NETLINK = 270
NETLINK_CAP_ACK, NETLINK_EXT_ACK, NETLINK_GET_STRICT_CHK = 10, 11, 12

HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, seq, pid
ATTR = struct.Struct("=HH")  # nlattr: length, type
_ERRNO = struct.Struct("=i")
_U8, _U16, _U32, _S32, _BE16 = (struct.Struct(f) for f in ("=B", "=H", "=I", "=i", "!H"))
DUMP_ATTEMPTS = 3  # a dump the kernel marks inconsistent (NLM_F_DUMP_INTR: the table changed meanwhile) is redone


class Message(NamedTuple):
    """One netlink message: header fields and the payload after the header."""

    type: int
    flags: int
    seq: int
    payload: bytes


class Request(NamedTuple):
    """A request to send: `what` names it in errors (e.g. "tc filter replace on ifindex 7")."""

    what: str
    type: int
    flags: int
    body: bytes


def malformed(what: str) -> OSError:
    return OSError(errno.EPROTO, f"malformed netlink answer: {what}")


# -- attributes ------------------------------------------------------------------------------------------------
def align4(n: int) -> int:
    return (n + 3) & ~3


def attr(kind: int, payload: bytes) -> bytes:
    """One attribute, padded to 4 bytes."""
    data = ATTR.pack(ATTR.size + len(payload), kind) + payload
    return data + b"\0" * (align4(len(data)) - len(data))


def attr_u8(kind: int, value: int) -> bytes:
    return attr(kind, _U8.pack(value))


def attr_u32(kind: int, value: int) -> bytes:
    return attr(kind, _U32.pack(value))


def attr_s32(kind: int, value: int) -> bytes:
    return attr(kind, _S32.pack(value))


def attr_be16(kind: int, value: int) -> bytes:
    return attr(kind, _BE16.pack(value))


def attr_str(kind: int, value: str) -> bytes:
    """A NUL-terminated string attribute (interface names, tc kinds)."""
    return attr(kind, value.encode() + b"\0")


def nested(kind: int, attrs: Iterable[bytes]) -> bytes:
    """A nested attribute holding `attrs` (flagged NLA_F_NESTED, as libmnl and iproute2 do)."""
    return attr(kind | NLA_F_NESTED, b"".join(attrs))


def parse_attrs(buf: bytes, off: int = 0, *, where: str = "attributes") -> dict[int, bytes]:
    """Attributes from `off` to the end of `buf`: type (flags masked off) -> payload, the first of each type.
    OSError EPROTO naming `where` when one runs past the end or claims less than its own header."""
    out: dict[int, bytes] = {}
    end = len(buf)
    unpack = ATTR.unpack_from
    while off + 4 <= end:
        length, kind = unpack(buf, off)
        kind &= NLA_TYPE_MASK
        if length < 4 or off + length > end:
            raise malformed(f"{where}: attribute {kind} of length {length} at offset {off} in {end} bytes")
        if kind not in out:
            out[kind] = buf[off + 4 : off + length]
        off += (length + 3) & ~3
    return out


def get_u8(attrs: dict[int, bytes], kind: int, default: int = 0) -> int:
    return _unpack(_U8, attrs, kind, default)


def get_u32(attrs: dict[int, bytes], kind: int, default: int = 0) -> int:
    return _unpack(_U32, attrs, kind, default)


def get_s32(attrs: dict[int, bytes], kind: int, default: int = 0) -> int:
    return _unpack(_S32, attrs, kind, default)


def get_be16(attrs: dict[int, bytes], kind: int, default: int = 0) -> int:
    return _unpack(_BE16, attrs, kind, default)


def get_str(attrs: dict[int, bytes], kind: int) -> str | None:
    raw = attrs.get(kind)
    return raw.split(b"\0", 1)[0].decode(errors="replace") if raw is not None else None


def _unpack(fmt: struct.Struct, attrs: dict[int, bytes], kind: int, default: int) -> int:
    raw = attrs.get(kind)
    if raw is None:
        return default
    if len(raw) < fmt.size:
        raise malformed(f"attribute {kind} has {len(raw)} bytes, expected {fmt.size}")
    return int(fmt.unpack_from(raw)[0])


def unpack_header(fmt: struct.Struct, payload: bytes, what: str) -> tuple[int, ...]:
    """A message's fixed header (ifinfomsg, rtmsg...), OSError EPROTO when the payload is too short."""
    if len(payload) < fmt.size:
        raise malformed(f"{what}: {len(payload)} bytes, shorter than its {fmt.size}-byte header")
    return tuple(fmt.unpack_from(payload))


# -- messages --------------------------------------------------------------------------------------------------
def encode(request: Request, seq: int, pid: int = 0) -> bytes:
    """The bytes of `request` with sequence number `seq`."""
    return HEADER.pack(HEADER.size + len(request.body), request.type, request.flags, seq, pid) + request.body


def split_messages(data: bytes) -> list[Message]:
    """The messages of one datagram. OSError EPROTO when a length is impossible."""
    out = []
    off = 0
    while off + HEADER.size <= len(data):
        length, mtype, flags, seq, _pid = HEADER.unpack_from(data, off)
        if length < HEADER.size or off + length > len(data):
            raise malformed(f"message of length {length} at offset {off} in a {len(data)}-byte datagram")
        out.append(Message(mtype, flags, seq, bytes(data[off + HEADER.size : off + length])))
        off += align4(length)
    return out


def error_of(msg: Message) -> tuple[int, str | None]:
    """(errno, the kernel's explanation) of an NLMSG_ERROR or NLMSG_DONE; errno 0 = success (the ACK, or a
    completed dump)."""
    if len(msg.payload) < _ERRNO.size:
        if msg.type == NLMSG_DONE:
            return 0, None  # some families end a dump with an empty DONE
        raise malformed(f"NLMSG_ERROR of {len(msg.payload)} bytes")
    err = -_ERRNO.unpack_from(msg.payload)[0]
    text = None
    if msg.flags & NLM_F_ACK_TLVS:
        # NLMSG_ERROR: errno, then the request's header (its body is left out: NETLINK_CAP_ACK), then attributes
        off = _ERRNO.size + (HEADER.size if msg.type == NLMSG_ERROR else 0)
        try:
            text = get_str(parse_attrs(msg.payload, off, where="extended ACK"), NLMSGERR_ATTR_MSG)
        except OSError:
            text = None  # the explanation is a courtesy; the errno is what counts
    return err, text


def failure(what: str, err: int, text: str | None = None) -> OSError:
    """The OSError for a refused request: 'tc filter add on ifindex 7 (veth1): EEXIST (File exists)'."""
    name = errno.errorcode.get(err, str(err))
    return OSError(err, f"{what}: {name} ({os.strerror(err)})" + (f": {text}" if text else ""))


class Collector:
    """The answer to one request, fed message by message (pure: `NetlinkSocket` does the reading).

    `feed()` returns True once the answer is complete; `result` then holds the messages of the answer (not the
    ACK or DONE). Raises the request's failure when the kernel refuses it."""

    def __init__(self, request: Request, seq: int) -> None:
        self.request, self.seq = request, seq
        self.dump = request.flags & NLM_F_DUMP == NLM_F_DUMP
        self.acked = bool(request.flags & NLM_F_ACK)
        self.result: list[Message] = []
        self.interrupted = False

    def feed(self, msg: Message) -> bool:
        if msg.seq != self.seq or msg.type == NLMSG_NOOP:
            return False  # a late answer to an earlier request that timed out; or padding
        if msg.flags & NLM_F_DUMP_INTR:
            self.interrupted = True
        if msg.type in (NLMSG_ERROR, NLMSG_DONE):
            err, text = error_of(msg)
            if err:
                raise failure(self.request.what, err, text)
            if msg.type == NLMSG_DONE and not self.dump:
                raise malformed(f"{self.request.what}: NLMSG_DONE in answer to a request that is not a dump")
            return True
        self.result.append(msg)
        return not self.dump and not self.acked  # a get is answered by its one message


class NetlinkSocket:
    """A netlink socket of one protocol (NETLINK_ROUTE, NETLINK_NETFILTER) in the namespace of the thread that
    creates it; blocking, every request bounded by `timeout` seconds. Not thread-safe: one request at a time.

    `strict`: NETLINK_GET_STRICT_CHK (Linux >= 4.20), without which the kernel ignores dump filters."""

    RECV_SIZE = 1 << 17

    def __init__(self, protocol: int, *, timeout: float = 5.0, strict: bool = False) -> None:
        self.timeout = timeout
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol)
        try:
            for opt, wanted in ((NETLINK_EXT_ACK, True), (NETLINK_CAP_ACK, True), (NETLINK_GET_STRICT_CHK, strict)):
                if wanted:
                    self._sock.setsockopt(SOL_NETLINK, opt, 1)
            self._sock.settimeout(timeout)
            self._sock.bind((0, 0))
        except BaseException:
            self._sock.close()
            raise
        self._seq = int(time.time()) & 0x7FFFFFFF

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> NetlinkSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, request: Request, parse: Callable[[Message], T]) -> list[T]:
        """Send `request`; its answer's messages, each through `parse` (whose OSError EPROTO is renamed after
        the request). A dump the kernel marks interrupted is redone (DUMP_ATTEMPTS times, then EAGAIN)."""
        for _attempt in range(DUMP_ATTEMPTS):
            collector = self._exchange(request)
            if not collector.interrupted:
                try:
                    return [parse(msg) for msg in collector.result]
                except OSError as e:
                    raise OSError(e.errno, f"{request.what}: {e.strerror}") from e
        raise failure(request.what, errno.EAGAIN, f"the dump was interrupted {DUMP_ATTEMPTS} times by changes")

    def _exchange(self, request: Request) -> Collector:
        self._seq = self._seq + 1 if self._seq < 0x7FFFFFFF else 1
        collector = Collector(request, self._seq)
        deadline = time.monotonic() + self.timeout
        try:
            self._sock.send(encode(request, self._seq))
            while True:
                self._sock.settimeout(max(deadline - time.monotonic(), 0.001))
                data, _anc, flags, _addr = self._sock.recvmsg(self.RECV_SIZE)
                if flags & socket.MSG_TRUNC:
                    raise malformed(f"a datagram longer than {self.RECV_SIZE} bytes")
                for msg in split_messages(data):
                    if collector.feed(msg):
                        return collector
        except TimeoutError as e:
            raise TimeoutError(errno.ETIMEDOUT, f"{request.what}: no answer from the kernel within "
                                                f"{self.timeout:g} s") from e
        except OSError as e:
            if e.strerror and e.strerror.startswith(request.what):
                raise
            raise OSError(e.errno, f"{request.what}: {e.strerror}") from e


class NetlinkClient:
    """A client of one ``NetlinkSocket`` (``sock``), closed with it, also as a context manager."""

    sock: NetlinkSocket

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
