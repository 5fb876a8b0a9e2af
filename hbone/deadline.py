"""A deadline restarted far more often than it is reached (a pooled connection's idle time, a server's wait for
headers): one timer, which, firing before the deadline because the count restarted meanwhile, sets itself again
for what is left, instead of a timer cancelled and set anew on every restart (two operations on the loop's timer
heap per stream on the connection path)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Deadline:
    """Calls ``expired`` once ``timeout`` seconds have passed since the last ``start`` without a ``stop``."""

    __slots__ = ("_expired", "_loop", "_running", "_since", "_timeout", "_timer")

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float, expired: Callable[[], None]) -> None:
        self._loop, self._timeout, self._expired = loop, timeout, expired
        self._since = 0.0  # loop time of the last start
        self._running = False
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Count from now (again, if counting)."""
        self._since, self._running = self._loop.time(), True
        if self._timer is None:
            self._timer = self._loop.call_at(self._since + self._timeout, self._check)

    def stop(self) -> None:
        """Stop counting. The timer stays: it finds nothing due, or what is left if the count started again."""
        self._running = False

    def cancel(self) -> None:
        """Stop counting and drop the timer: its owner is gone."""
        self._running = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        if not self._running:
            return
        due = self._since + self._timeout
        if self._loop.time() < due:
            self._timer = self._loop.call_at(due, self._check)
            return
        self._running = False
        self._expired()
