"""Python mirrors of bpf/redirect.h (map values, the ring-buffer event, constants).

tests/unit/capture/test_maps_and_programs.py checks these against the header, so a change on one side fails loudly.
"""

from __future__ import annotations

import ctypes
import enum
import ipaddress
import socket
import struct
from dataclasses import dataclass

F_FAIL_OPEN = 1 << 0
F_LOOKUP_SELECTS = 1 << 1
F_NODE_PASSES = 1 << 2

IF_POD = 1
IF_UPLINK = 2
IF_BRIDGE = 3


class Listener(enum.IntEnum):
    """Agent listener slots (config.port index; the sockmap index for IPv4, plus LISTENER_FAMILY_STRIDE for IPv6)."""

    OUTBOUND = 0
    INBOUND = 1
    HBONE = 2


LISTENER_FAMILY_STRIDE = len(Listener)  # AMBIT_L_COUNT: the IPv6 slots follow the IPv4 ones


class EventType(enum.IntEnum):
    """ambit_event.type"""

    SYN = 1
    FIN = 2
    RST = 3
    DROP = 4


class Verdict(enum.IntEnum):
    """ambit_event.verdict"""

    REDIRECTED = 1
    STEERED = 2
    PASSED = 3
    DROPPED = 4


class Reason(enum.IntEnum):
    """ambit_event.reason"""

    NONE = 0
    NO_LISTENER = 1
    ASSIGN_FAIL = 2
    STALE_FLOW = 3
    FAIL_OPEN = 4
    SPOOFED = 5
    FRAGMENT = 6


class Hook(enum.IntEnum):
    """ambit_event.hook: which program saw the packet."""

    POD = 0
    UPLINK = 1
    DOOR = 2


class Counter(enum.IntEnum):
    """Indices of the per-CPU `counters` array."""

    REDIRECT_OUT = 0
    REDIRECT_IN = 1
    REDIRECT_HBONE = 2
    STEERED = 3
    DROP_NO_LISTENER = 4
    DROP_STALE = 5
    DROP_ASSIGN = 6
    FAIL_OPEN = 7
    EVENTS_LOST = 8
    LOOKUP_SELECTED = 9
    DROP_SPOOFED = 10
    REDIRECT_DOOR = 11
    PROBE_PASSED = 12
    DROP_FRAGMENT = 13


COUNTER_COUNT = len(Counter)


class ConfigC(ctypes.Structure):
    """struct ambit_config"""

    _fields_ = [
        ("flags", ctypes.c_uint32),
        ("mark", ctypes.c_uint32),
        ("port", ctypes.c_uint16 * 3),
        ("_pad", ctypes.c_uint16),
    ]


class AddrC(ctypes.Structure):
    """struct ambit_addr: an IPv6 address, or an IPv4 one as IPv4-mapped (::ffff:a.b.c.d), network byte order"""

    _fields_ = [("w", ctypes.c_uint32 * 4)]  # four network-order words, as the C side reads them

    @classmethod
    def of(cls, ip: str) -> AddrC:
        return cls.from_buffer_copy(ip_key(ip))

    @property
    def ip(self) -> str:
        return key_ip(bytes(self))


class PodC(ctypes.Structure):
    """struct ambit_pod"""

    _fields_ = [("ifindex", ctypes.c_uint32), ("_pad", ctypes.c_uint32)]


class ProbePortC(ctypes.Structure):
    """struct ambit_probe_port (key of the probe_ports map; address and port in network byte order)"""

    _fields_ = [("addr", AddrC), ("port", ctypes.c_uint16), ("_pad", ctypes.c_uint16)]

    @classmethod
    def of(cls, ip: str, port: int) -> ProbePortC:
        return cls(addr=AddrC.of(ip), port=socket.htons(port))


class BridgePortC(ctypes.Structure):
    """struct ambit_bridge_port"""

    _fields_ = [("mac", ctypes.c_uint8 * 6), ("_pad", ctypes.c_uint16), ("ifindex", ctypes.c_uint32)]


class EventC(ctypes.Structure):
    """struct ambit_event (56 bytes)"""

    _fields_ = [
        ("ts_ns", ctypes.c_uint64),
        ("saddr", AddrC),
        ("daddr", AddrC),
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
        ("ifindex", ctypes.c_uint32),
        ("type", ctypes.c_uint8),
        ("tcp_flags", ctypes.c_uint8),
        ("hook", ctypes.c_uint8),
        ("verdict", ctypes.c_uint8),
        ("listener_port", ctypes.c_uint16),
        ("reason", ctypes.c_uint16),
    ]


IPV4_MAPPED_PREFIX = b"\0" * 10 + b"\xff\xff"


def canonical(ip: str) -> str:
    """An address as the capture spells it: IPv4 dotted (also for an IPv4-mapped IPv6 one), IPv6 compressed.
    ValueError names the bad address."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        raise ValueError(f"not an IP address: {ip!r}") from None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def ip_key(ip: str) -> bytes:
    """An address as the 16 bytes the BPF maps use (struct ambit_addr): IPv6 as is, IPv4 as IPv4-mapped."""
    addr = ipaddress.ip_address(canonical(ip))
    return addr.packed if addr.version == 6 else IPV4_MAPPED_PREFIX + addr.packed


def key_ip(key: bytes) -> str:
    """Inverse of ip_key (an IPv4-mapped key reads as IPv4)."""
    addr = ipaddress.IPv6Address(bytes(key))
    return str(addr.ipv4_mapped or addr)


_REASONS = {
    Reason.NO_LISTENER: "no agent listener (agent down), fail-closed",
    Reason.ASSIGN_FAIL: "the kernel refused to hand the packet to the agent's socket",
    Reason.STALE_FLOW: "packet of a captured flow whose proxy socket is gone",
    Reason.FAIL_OPEN: "fail-open: no agent listener",
    Reason.SPOOFED: "source address of an enrolled pod arriving on another interface (spoofed)",
    Reason.FRAGMENT: "TCP fragment to or from an enrolled pod (fragments cannot be captured)",
}
_ACTIONS = {
    Verdict.STEERED: "steered back to the proxy's socket",
    Verdict.PASSED: "passed through uncaptured",
}


def event_action(type_: EventType, verdict: Verdict, listener_port: int) -> str:
    """What the program did with the packet, in words."""
    if verdict == Verdict.DROPPED:
        return type_.name.lower()
    return _ACTIONS.get(verdict, f"redirected to the proxy on :{listener_port}")


def reason_text(reason: Reason) -> str:
    """Why, in words ("" when the program gave no reason)."""
    if reason == Reason.NONE:
        return ""
    return _REASONS.get(reason, reason.name.lower().replace("_", " "))


@dataclass(frozen=True)
class FlowEvent:
    """One per-flow event from the kernel (see struct ambit_event in bpf/redirect.h)."""

    ts_ns: int  # CLOCK_MONOTONIC (time.monotonic_ns() scale)
    src: str
    sport: int
    dst: str
    dport: int
    ifindex: int
    type: EventType
    tcp_flags: int
    hook: Hook
    verdict: Verdict
    listener_port: int
    reason: Reason

    @property
    def action(self) -> str:
        """What the program did with the packet, in words."""
        return event_action(self.type, self.verdict, self.listener_port)

    @property
    def reason_text(self) -> str:
        """Why, in words ("" when the program gave no reason)."""
        return reason_text(self.reason)

    @classmethod
    def from_bytes(cls, raw: bytes) -> FlowEvent:
        """Decode a ring-buffer record (struct ambit_event). ValueError names a field the header does not
        define a value for, or says the record's size is not the struct's. About 2 us: the agent decodes a
        record only when someone reads its flow (``EventKind`` says what it is, for metrics, at read time)."""
        if len(raw) != EVENT_SIZE:
            raise ValueError(f"ambit_event: a record of {len(raw)} bytes, the struct has {EVENT_SIZE}")
        (ts_ns, saddr, daddr, sport, dport, ifindex, type_, tcp_flags, hook, verdict, listener_port,
         reason) = _EVENT.unpack_from(raw)
        return cls(ts_ns, event_ip(saddr), _ntohs(sport), event_ip(daddr), _ntohs(dport), ifindex,
                   *_kind(type_, tcp_flags, hook, verdict, listener_port, reason))

    def to_bytes(self) -> bytes:
        """The record the programs write for this event (through the ctypes mirror: for checks and benchmarks)."""
        return bytes(EventC(self.ts_ns, AddrC.of(self.src), AddrC.of(self.dst), socket.htons(self.sport),
                            socket.htons(self.dport), self.ifindex, self.type, self.tcp_flags, self.hook,
                            self.verdict, self.listener_port, self.reason))


@dataclass(frozen=True)
class EventKind:
    """What an event says beyond its addresses, ports and time: the bytes ``EVENT_KIND`` of a record. A few
    values cover every connection's events, so the agent reads them once per value, not once per event."""

    type: EventType
    tcp_flags: int
    hook: Hook
    verdict: Verdict
    listener_port: int
    reason: Reason

    @classmethod
    def from_bytes(cls, kind: bytes) -> EventKind:
        """Decode ``record[EVENT_KIND]``; ValueError names a field the header does not define a value for."""
        if len(kind) != _KIND.size:
            raise ValueError(f"ambit_event: {len(kind)} bytes from type to reason, the struct has {_KIND.size}")
        return cls(*_kind(*_KIND.unpack(kind)))

    @property
    def action(self) -> str:
        return event_action(self.type, self.verdict, self.listener_port)

    @property
    def reason_text(self) -> str:
        return reason_text(self.reason)


def _kind(type_: int, tcp_flags: int, hook: int, verdict: int, listener_port: int,
          reason: int) -> tuple[EventType, int, Hook, Verdict, int, Reason]:
    try:
        return (_EVENT_TYPES[type_], tcp_flags, _HOOKS[hook], _VERDICTS[verdict], listener_port,
                _REASON_CODES[reason])
    except KeyError:
        for name, value, known in (("type", type_, _EVENT_TYPES), ("hook", hook, _HOOKS),
                                   ("verdict", verdict, _VERDICTS), ("reason", reason, _REASON_CODES)):
            if value not in known:
                raise ValueError(f"ambit_event.{name}: unknown value {value}") from None
        raise


# struct ambit_event (EventC) as struct reads it, host byte order; the ports arrive in network order.
_EVENT = struct.Struct("=Q16s16sHHIBBBBHH")
EVENT_SIZE = _EVENT.size
assert ctypes.sizeof(EventC) == EVENT_SIZE
# Where a record's parts are: its two addresses (16 bytes, as ip_key spells them) and its kind (type to reason).
EVENT_SOURCE = slice(EventC.saddr.offset, EventC.saddr.offset + ctypes.sizeof(AddrC))
EVENT_DESTINATION = slice(EventC.daddr.offset, EventC.daddr.offset + ctypes.sizeof(AddrC))
EVENT_KIND = slice(EventC.type.offset, EVENT_SIZE)
_KIND = struct.Struct("=BBBBHH")
assert _KIND.size == EVENT_KIND.stop - EVENT_KIND.start and EventC.reason.offset + 2 == EVENT_SIZE
_EVENT_TYPES = {int(m): m for m in EventType}
_HOOKS = {int(m): m for m in Hook}
_VERDICTS = {int(m): m for m in Verdict}
_REASON_CODES = {int(m): m for m in Reason}
_ZERO12 = bytes(12)
_ntohs = socket.ntohs


def event_ip(raw: bytes) -> str:
    """key_ip for an event's address, without building ipaddress objects (the kernel sends several per connection)."""
    if raw[:12] == IPV4_MAPPED_PREFIX:
        return socket.inet_ntop(socket.AF_INET, raw[12:])
    if raw[:12] == _ZERO12:  # ::, ::1, IPv4-compatible: inet_ntop writes these as "::a.b.c.d"
        return key_ip(raw)
    return socket.inet_ntop(socket.AF_INET6, raw)
