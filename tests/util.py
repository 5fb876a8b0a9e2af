"""Small helpers shared by the tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


async def eventually(condition: Callable[[], bool], within: float = 5.0, interval: float = 0.01) -> bool:
    """Wait (bounded) until ``condition()`` holds; returns its last value, for the caller to assert."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            return condition()
        await asyncio.sleep(interval)
    return True
