"""Python mirrors of bpf/redirect.h (map values, the ring-buffer event, constants).

tests/unit/capture/test_maps_and_programs.py checks these against the header, so a change on one side fails loudly.
"""

from __future__ import annotations

import ctypes
import enum
import ipaddress
import socket
from dataclasses import dataclass

F_FAIL_OPEN = 1 << 0
F_LOOKUP_SELECTS = 1 << 1
F_NODE_PASSES = 1 << 2

IF_POD = 1
IF_UPLINK = 2
IF_BRIDGE = 3


class Listener(enum.IntEnum):
    """Agent listener slots (sockmap index and config.port index)."""

    OUTBOUND = 0
    INBOUND = 1
    HBONE = 2


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


COUNTER_COUNT = len(Counter)


class ConfigC(ctypes.Structure):
    """struct ambit_config"""

    _fields_ = [
        ("flags", ctypes.c_uint32),
        ("mark", ctypes.c_uint32),
        ("port", ctypes.c_uint16 * 3),
        ("_pad", ctypes.c_uint16),
    ]


class PodC(ctypes.Structure):
    """struct ambit_pod"""

    _fields_ = [("ifindex", ctypes.c_uint32), ("_pad", ctypes.c_uint32)]


class ProbePortC(ctypes.Structure):
    """struct ambit_probe_port (key of the probe_ports map; address and port in network byte order)"""

    _fields_ = [("addr", ctypes.c_uint32), ("port", ctypes.c_uint16), ("_pad", ctypes.c_uint16)]

    @classmethod
    def of(cls, ip: str, port: int) -> ProbePortC:
        return cls(addr=ip_key(ip), port=socket.htons(port))


class BridgePortC(ctypes.Structure):
    """struct ambit_bridge_port"""

    _fields_ = [("mac", ctypes.c_uint8 * 6), ("_pad", ctypes.c_uint16)]


class EventC(ctypes.Structure):
    """struct ambit_event (32 bytes)"""

    _fields_ = [
        ("ts_ns", ctypes.c_uint64),
        ("saddr", ctypes.c_uint32),
        ("daddr", ctypes.c_uint32),
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


def ip_key(ip: str) -> int:
    """An IPv4 address as the u32 the BPF maps use (network byte order bytes read as a native u32)."""
    return int.from_bytes(ipaddress.IPv4Address(ip).packed, "little")


def key_ip(key: int) -> str:
    """Inverse of ip_key."""
    return str(ipaddress.IPv4Address(int(key).to_bytes(4, "little")))


_REASONS = {
    Reason.NO_LISTENER: "no agent listener (agent down), fail-closed",
    Reason.ASSIGN_FAIL: "the kernel refused to hand the packet to the agent's socket",
    Reason.STALE_FLOW: "packet of a captured flow whose proxy socket is gone",
    Reason.FAIL_OPEN: "fail-open: no agent listener",
    Reason.SPOOFED: "source address of an enrolled pod arriving on another interface (spoofed)",
}
_ACTIONS = {
    Verdict.STEERED: "steered back to the proxy's socket",
    Verdict.PASSED: "passed through uncaptured",
}


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
        if self.verdict == Verdict.DROPPED:
            return self.type.name.lower()
        return _ACTIONS.get(self.verdict, f"redirected to the proxy on :{self.listener_port}")

    @property
    def reason_text(self) -> str:
        """Why, in words ("" when the program gave no reason)."""
        if self.reason == Reason.NONE:
            return ""
        return _REASONS.get(self.reason, self.reason.name.lower().replace("_", " "))

    @classmethod
    def from_bytes(cls, raw: bytes) -> FlowEvent:
        """Decode a ring-buffer record."""
        ev = EventC.from_buffer_copy(raw[: ctypes.sizeof(EventC)])
        return cls(
            ts_ns=ev.ts_ns,
            src=key_ip(ev.saddr),
            sport=socket.ntohs(ev.sport),
            dst=key_ip(ev.daddr),
            dport=socket.ntohs(ev.dport),
            ifindex=ev.ifindex,
            type=EventType(ev.type),
            tcp_flags=ev.tcp_flags,
            hook=Hook(ev.hook),
            verdict=Verdict(ev.verdict),
            listener_port=ev.listener_port,
            reason=Reason(ev.reason),
        )
