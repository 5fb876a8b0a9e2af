"""What telemetry needs to know of the eBPF events, in its own terms (telemetry does not import capture).

The events arrive as records in the kernel's ring buffer, several per connection. Telemetry keeps each record
as it came and makes a flow of it only when someone reads flows: what metrics need (what kind of event, the
source's address family) and the two addresses are byte ranges of the record, compared and counted as bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class KernelKind:
    """What every event of one kind says (a kind: the bytes ``KernelRecords.kind`` of a record)."""

    tcp_flags: int
    toward_pod: bool  # seen on its way in to a local pod (the uplink program), else leaving a pod
    dropped: bool
    action: str  # what the program did, in words ("redirected to the proxy on :15001")
    reason: str  # why, in words; "" when there is nothing to say
    reason_code: str  # the drop cause for hubble_drop_total ("NO_LISTENER"), "" when there is none


@dataclass(frozen=True, slots=True)
class KernelEvent:
    """One packet the capture programs reported (a SYN, FIN, RST, or a drop): a record decoded."""

    ts_ns: int  # CLOCK_MONOTONIC (time.monotonic_ns() scale)
    src: str
    sport: int
    dst: str
    dport: int
    kind: KernelKind


class KernelRecords(Protocol):
    """The kernel's ring buffer of events, read on the event loop without waiting.

    A record is ``size`` bytes; ``source_address`` and ``destination_address`` are where its two addresses are
    (16 bytes each: the same address, the same bytes), ``kind`` where the bytes that say what it is are (type,
    TCP flags, verdict, reason...: a few values for all connections)."""

    size: int
    kind: slice
    source_address: slice
    destination_address: slice

    def fileno(self) -> int:
        """Readable (level-triggered) while records wait."""
        ...

    def read(self, limit: int) -> list[bytes]:
        """Up to ``limit`` waiting records, oldest first; fewer when no more are waiting."""
        ...

    def describe(self, kind: bytes) -> KernelKind:
        """What ``record[kind]`` says; ValueError naming the field when it holds a value the format does not define."""
        ...

    def address(self, raw: bytes) -> str:
        """``record[source_address]`` or ``record[destination_address]`` as an IP address string."""
        ...

    def decode(self, record: bytes) -> KernelEvent:
        """The whole record (one ``describe`` accepted, and of ``size`` bytes)."""
        ...

    @property
    def lost_events(self) -> int:
        """Events the kernel could not queue since it started counting (a syscall: read it sparingly)."""
        ...
