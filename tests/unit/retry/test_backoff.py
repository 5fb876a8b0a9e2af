"""The retry policy: doubling from ``initial`` up to ``cap``, and jitter taking off at most its share."""

from __future__ import annotations

import pytest

from agent.retry import Backoff


def test_grows_by_its_factor_to_its_cap() -> None:
    backoff = Backoff(initial=0.5, cap=30.0, jitter=0.25)
    assert [backoff.delay(n, 0.0) for n in range(1, 10)] == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    assert backoff.delay(0, 0.0) == 0.5  # no failure yet counts as the first
    assert backoff.delay(10**9, 0.0) == 30  # no overflow however long it has failed
    assert Backoff(initial=1.0, cap=100.0, factor=3.0).delay(4, 0.0) == 27


@pytest.mark.parametrize("failures", [1, 5, 7, 40])
def test_jitter_takes_off_at_most_its_share(failures: int) -> None:
    backoff = Backoff(initial=0.5, cap=30.0, jitter=0.25)
    top = backoff.delay(failures, 0.0)
    assert backoff.delay(failures, 0.5) == pytest.approx(top * 0.875)
    assert top * 0.75 < backoff.delay(failures, 0.999999) < top  # at the cap too: no two clients in step
    assert Backoff(initial=0.5, cap=30.0, jitter=0.0).delay(failures, 0.7) == top
