"""Kernel events read on the agent's event loop, a slice per turn of the loop.

Read on a thread of their own, the events took the interpreter (the GIL) from the event loop for as long as a
slice of them lasted, right when a connection needed it: the sequential set-up p99 was mostly that. On the
loop, a slice runs between two polls for I/O, so a connection waits behind one slice at most (~0.1 ms), and
no thread hand-off is paid. Woken by the source's file descriptor, the pump lets events gather
``KERNEL_BATCH`` first: a connection brings several events, and one wake-up per event cost more than the
events. The kernel's ring buffer holds 4096 events, 40,000/s at this pace; events it could not take are
counted every ``LOST_CHECK`` (hubble_lost_events_total), never silently dropped.
"""

from __future__ import annotations

import asyncio
import logging

from agent.telemetry.kernel import KernelEventSource
from agent.telemetry.recorder import FlowRecorder

log = logging.getLogger(__name__)

KERNEL_BATCH = 0.1
KERNEL_SLICE = 8  # events delivered per turn of the loop (~10 us each)
LOST_CHECK = 0.2


class KernelPump:
    """Delivers ``source``'s events to its subscribers on ``loop`` and counts its losses in ``recorder``."""

    def __init__(self, source: KernelEventSource, recorder: FlowRecorder, loop: asyncio.AbstractEventLoop) -> None:
        self._source, self._recorder, self._loop = source, recorder, loop
        self._fd = source.fileno()
        self._lost = source.lost_events
        self._next: asyncio.Handle | None = None
        self._check: asyncio.TimerHandle | None = loop.call_later(LOST_CHECK, self._check_lost)
        loop.add_reader(self._fd, self._readable)

    def _readable(self) -> None:
        self._loop.remove_reader(self._fd)
        self._next = self._loop.call_later(KERNEL_BATCH, self._drain)

    def _drain(self) -> None:
        try:
            more = self._source.read_events(KERNEL_SLICE) >= KERNEL_SLICE
        except Exception:  # a subscriber's bug must not end the reading (the event is gone either way)
            log.exception("kernel events: delivering a slice failed")
            more = True
        if more:
            self._next = self._loop.call_soon(self._drain)
        else:
            self._next = None
            self._loop.add_reader(self._fd, self._readable)

    def _check_lost(self) -> None:
        now = self._source.lost_events
        if now > self._lost:
            self._recorder.lost_kernel_events(now - self._lost)
            self._lost = now
        self._check = self._loop.call_later(LOST_CHECK, self._check_lost)

    def close(self) -> None:
        """Stop reading (from the loop's thread)."""
        self._loop.remove_reader(self._fd)
        for handle in (self._next, self._check):
            if handle is not None:
                handle.cancel()
        self._next = self._check = None
