"""Capture's eBPF events handed to telemetry in telemetry's own terms (neither package imports the other)."""

from __future__ import annotations

from typing import Protocol

from agent.capture import maps
from agent.capture.maps import EventKind, FlowEvent, Hook, Reason, Verdict
from agent.telemetry.kernel import KernelEvent, KernelKind

_KINDS_MAX = 1024  # kinds described (a few for all connections; a bound all the same)


class EventRing(Protocol):
    """The part of ``capture.Redirector`` that reads its ring buffer."""

    @property
    def events_fd(self) -> int: ...

    def read_events(self, limit: int) -> list[bytes]: ...

    @property
    def lost_events(self) -> int: ...


def kernel_kind(kind: EventKind) -> KernelKind:
    return KernelKind(kind.tcp_flags, kind.hook in (Hook.UPLINK, Hook.DOOR), kind.verdict == Verdict.DROPPED,
                      kind.action, kind.reason_text, kind.reason.name if kind.reason != Reason.NONE else "")


class KernelEvents:
    """A ``telemetry.kernel.KernelRecords`` over the redirector's ring buffer (struct ambit_event records)."""

    size = maps.EVENT_SIZE
    kind = maps.EVENT_KIND
    source_address = maps.EVENT_SOURCE
    destination_address = maps.EVENT_DESTINATION

    def __init__(self, ring: EventRing) -> None:
        self._ring = ring
        self._kinds: dict[bytes, KernelKind] = {}  # a few values for all connections (bounded all the same)

    def fileno(self) -> int:
        return self._ring.events_fd

    def read(self, limit: int) -> list[bytes]:
        return self._ring.read_events(limit)

    def describe(self, kind: bytes) -> KernelKind:
        described = self._kinds.get(kind)
        if described is None:
            if len(self._kinds) >= _KINDS_MAX:
                self._kinds.clear()
            described = self._kinds[kind] = kernel_kind(EventKind.from_bytes(kind))
        return described

    def address(self, raw: bytes) -> str:
        return maps.event_ip(raw)

    def decode(self, record: bytes) -> KernelEvent:
        ev = FlowEvent.from_bytes(record)
        return KernelEvent(ev.ts_ns, ev.src, ev.sport, ev.dst, ev.dport, self.describe(record[self.kind]))

    @property
    def lost_events(self) -> int:
        return self._ring.lost_events
