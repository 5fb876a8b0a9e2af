"""Capture's eBPF events handed to telemetry in telemetry's own terms (neither package imports the other)."""

from __future__ import annotations

from collections.abc import Callable

from agent.capture import FlowEvent, Hook, Reason, Redirector, Verdict
from agent.telemetry.kernel import KernelEvent


def kernel_event(ev: FlowEvent) -> KernelEvent:
    return KernelEvent(
        ts_ns=ev.ts_ns, src=ev.src, sport=ev.sport, dst=ev.dst, dport=ev.dport, tcp_flags=ev.tcp_flags,
        toward_pod=ev.hook in (Hook.UPLINK, Hook.DOOR), dropped=ev.verdict == Verdict.DROPPED, action=ev.action,
        reason=ev.reason_text, reason_code=ev.reason.name if ev.reason != Reason.NONE else "")


class KernelEvents:
    """A ``telemetry.kernel.KernelEventSource`` over the redirector's ring buffer."""

    def __init__(self, redirector: Redirector) -> None:
        self._redirector = redirector

    def subscribe(self, callback: Callable[[KernelEvent], None]) -> None:
        self._redirector.subscribe(lambda ev: callback(kernel_event(ev)))

    def poll_events(self, timeout_ms: int) -> int:
        return len(self._redirector.poll_events(timeout_ms))

    @property
    def lost_events(self) -> int:
        return self._redirector.lost_events
