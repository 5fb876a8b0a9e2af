"""Reading the kernel's events on the event loop, in batches, with no thread and no wake-up while none arrive.

The ring buffer's fd is watched until it is readable; then the reader stops watching and lets the next events
gather for ``batch`` seconds (a connection brings several, and each wake-up costs the loop more than an event),
reads at most ``chunk`` records per loop turn (the proxies' I/O runs between two chunks), and watches the fd
again once the ring is empty. The fd is level-triggered: events that arrived meanwhile make it readable at once.

Events the kernel could not queue are counted by the kernel (``KernelRecords.lost_events``, a syscall): read
after a batch, at most every ``lost_every`` seconds (a batch soon after the last reading leaves one for later),
and shown to readers where they happened (``FlowRecorder.lost_kernel_events``).
"""

from __future__ import annotations

import asyncio
import logging

from agent.telemetry.kernel import KernelRecords
from agent.telemetry.recorder import FlowRecorder

log = logging.getLogger(__name__)

# The ring buffer holds 4096 events: 400,000/s at this pace; events it could not take are counted
# (hubble_lost_events_total), never silently dropped. Every 100 ms, a batch at 1,000 connections/s was ~220 events,
# ~0.8 ms of the loop in a few chunks landing on the two or three connections then in flight (the sequential set-up
# p99); every 10 ms it is ~20 events, ~70 us on one, for ~90 more wake-ups a second under load.
KERNEL_BATCH = 0.01
KERNEL_CHUNK = 32  # records per loop turn: ~30 us of the loop, so that a batch delays no connection by much (p99)
LOST_EVERY = 0.2


class KernelReader:
    """Feeds ``recorder`` the records of ``source`` from the running event loop until ``close``."""

    def __init__(self, source: KernelRecords, recorder: FlowRecorder, *, batch: float = KERNEL_BATCH,
                 chunk: int = KERNEL_CHUNK, lost_every: float = LOST_EVERY) -> None:
        self._source, self._recorder = source, recorder
        self._batch, self._chunk, self._lost_every = batch, chunk, lost_every
        self._loop = asyncio.get_running_loop()
        self._fd = source.fileno()
        self._lost = source.lost_events
        self._lost_read_at = self._loop.time()
        self._lost_owed = False  # records were read since lost_events was
        self._lost_timer: asyncio.TimerHandle | None = None
        self._next: asyncio.Handle | None = None  # the scheduled drain
        self.wakeups = 0  # loop callbacks run (readable, drains, lost checks): for checks
        self._loop.add_reader(self._fd, self._readable)

    def _readable(self) -> None:
        self.wakeups += 1
        self._loop.remove_reader(self._fd)
        self._next = self._loop.call_later(self._batch, self._drain)

    def _drain(self) -> None:
        self.wakeups += 1
        self._next = None
        try:
            records = self._source.read(self._chunk)
            if records:
                self._lost_owed = True
                self._recorder.kernel_records(self._source, records)
        except Exception:  # never leave the ring unread: log, and read again after a batch's wait
            log.exception("reading the kernel's events failed; trying again in %.1f s", self._batch)
            self._next = self._loop.call_later(self._batch, self._drain)
            return
        self._lost_due()
        if len(records) >= self._chunk:  # more may wait: the next chunk after what else the loop has to do
            self._next = self._loop.call_soon(self._drain)
        else:
            self._loop.add_reader(self._fd, self._readable)

    def _lost_due(self) -> None:
        wait = self._lost_read_at + self._lost_every - self._loop.time()
        if wait <= 0:
            self._read_lost()
        elif self._lost_timer is None:
            self._lost_timer = self._loop.call_later(wait, self._lost_time)

    def _lost_time(self) -> None:
        self.wakeups += 1
        self._lost_timer = None
        self._read_lost()

    def _read_lost(self) -> None:
        if self._lost_timer is not None:
            self._lost_timer.cancel()
            self._lost_timer = None
        if not self._lost_owed:
            return
        try:
            now = self._source.lost_events
        except Exception:
            log.exception("reading the kernel's lost-event count failed")
            return
        self._lost_owed, self._lost_read_at = False, self._loop.time()
        if now > self._lost:
            self._recorder.lost_kernel_events(now - self._lost)
            self._lost = now

    def close(self) -> None:
        """Stop reading (the source stays open)."""
        self._loop.remove_reader(self._fd)
        for handle in (self._next, self._lost_timer):
            if handle is not None:
                handle.cancel()
        self._next = self._lost_timer = None
