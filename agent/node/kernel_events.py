"""Capture's eBPF events handed to telemetry in telemetry's own terms (neither package imports the other)."""

from __future__ import annotations

from collections.abc import Callable

from agent.capture import FlowEvent, Hook, Reason, Redirector, Verdict
from agent.telemetry.kernel import KernelEvent

# What an event says beyond its addresses (toward_pod, dropped, action, reason, reason_code), per (hook, type,
# verdict, listener port, reason): a few combinations, the same for every connection.
_Description = tuple[bool, bool, str, str, str]
_described: dict[tuple[int, int, int, int, int], _Description] = {}
_DESCRIBED_MAX = 1024  # the key space is small; a bound all the same (the listener port is 16 bits)


def kernel_event(ev: FlowEvent) -> KernelEvent:
    key = (ev.hook, ev.type, ev.verdict, ev.listener_port, ev.reason)
    described = _described.get(key)
    if described is None:
        if len(_described) >= _DESCRIBED_MAX:
            _described.clear()
        described = _described[key] = (ev.hook in (Hook.UPLINK, Hook.DOOR), ev.verdict == Verdict.DROPPED,
                                       ev.action, ev.reason_text, ev.reason.name if ev.reason != Reason.NONE else "")
    return KernelEvent(ev.ts_ns, ev.src, ev.sport, ev.dst, ev.dport, ev.tcp_flags, *described)


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
