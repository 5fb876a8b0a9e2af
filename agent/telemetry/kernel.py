"""What telemetry needs to know of an eBPF event, in its own terms (telemetry does not import capture)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class KernelEvent:
    """One packet the capture programs reported (a SYN, FIN, RST, or a drop)."""

    ts_ns: int  # CLOCK_MONOTONIC (time.monotonic_ns() scale)
    src: str
    sport: int
    dst: str
    dport: int
    tcp_flags: int
    toward_pod: bool  # seen on its way in to a local pod (the uplink program), else leaving a pod
    dropped: bool
    action: str  # what the program did, in words ("redirected to the proxy on :15001")
    reason: str  # why, in words; "" when there is nothing to say
    reason_code: str  # the drop cause for hubble_drop_total ("NO_LISTENER"), "" when there is none


class KernelEventSource(Protocol):
    """Where kernel events come from: ``poll_events`` delivers them to the subscribers and says how many."""

    def subscribe(self, callback: Callable[[KernelEvent], None]) -> None: ...

    def poll_events(self, timeout_ms: int) -> int: ...

    @property
    def lost_events(self) -> int: ...
