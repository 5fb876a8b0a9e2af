"""hbone.deadline.Deadline on a real event loop: it expires ``timeout`` after the last start, never while
stopped, and restarts keep the one timer it has."""

from __future__ import annotations

import asyncio

from hbone.deadline import Deadline

TIMEOUT = 0.05


async def test_it_expires_a_timeout_after_the_last_start_with_one_timer() -> None:
    loop = asyncio.get_running_loop()
    expired: list[float] = []
    deadline = Deadline(loop, TIMEOUT, lambda: expired.append(loop.time()))
    deadline.start()
    timer = deadline._timer
    await asyncio.sleep(TIMEOUT / 2)
    last_start = loop.time()
    deadline.start()  # again, half way: the count starts over, the timer is the same
    assert deadline._timer is timer
    for _ in range(100):
        if expired:
            break
        await asyncio.sleep(TIMEOUT / 5)
    assert len(expired) == 1 and expired[0] >= last_start + TIMEOUT
    await asyncio.sleep(2 * TIMEOUT)
    assert len(expired) == 1  # once


async def test_it_never_expires_while_stopped_and_counts_anew_when_started_again() -> None:
    loop = asyncio.get_running_loop()
    expired: list[float] = []
    deadline = Deadline(loop, TIMEOUT, lambda: expired.append(loop.time()))
    deadline.start()
    deadline.stop()
    await asyncio.sleep(3 * TIMEOUT)
    assert expired == []
    started = loop.time()
    deadline.start()
    for _ in range(100):
        if expired:
            break
        await asyncio.sleep(TIMEOUT / 5)
    assert len(expired) == 1 and expired[0] >= started + TIMEOUT


async def test_cancel_drops_the_timer() -> None:
    expired: list[bool] = []
    deadline = Deadline(asyncio.get_running_loop(), TIMEOUT, lambda: expired.append(True))
    deadline.start()
    deadline.cancel()
    assert deadline._timer is None
    await asyncio.sleep(3 * TIMEOUT)
    assert expired == []
