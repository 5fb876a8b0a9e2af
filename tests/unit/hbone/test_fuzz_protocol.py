"""The protocol-layer fuzz target in CI: a short campaign, seeded (reproducible: a failing seed replays with
``run_one(RandomSource(seed))``) and a short coverage-guided one under atheris; both must find nothing.
And the harness must be able to fail: a planted bug is found."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hbone.protocol import ServerConnection
from tests.fuzz.h2gen import RandomSource
from tests.fuzz.protocol_target import run_one

SEEDS = range(3000)


def test_seeded_sessions_find_nothing() -> None:
    reads = 0
    for seed in SEEDS:
        try:
            reads += run_one(RandomSource(seed))
        except Exception as e:
            raise AssertionError(f"seed {seed}: {type(e).__name__}: {e}") from e
    assert reads > 3 * len(SEEDS)  # sessions of some length, not empty ones


def test_a_planted_bug_is_found(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_accept(self: ServerConnection, stream_id: int) -> None:
        raise KeyError(stream_id)

    monkeypatch.setattr(ServerConnection, "accept", broken_accept)
    with pytest.raises(KeyError):
        for seed in range(500):
            run_one(RandomSource(seed))


def test_a_short_coverage_guided_campaign_finds_nothing(tmp_path: Path) -> None:
    env = dict(os.environ, HBONE_FUZZ_FINDINGS=str(tmp_path / "findings"))
    (tmp_path / "corpus").mkdir()
    done = subprocess.run([sys.executable, "-m", "tests.fuzz.protocol_atheris", "-runs=3000", "-seed=1",
                           "-max_len=4096", str(tmp_path / "corpus")], env=env, capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).parents[3], check=False)
    tail = done.stderr[-2000:]
    assert done.returncode == 0, tail
    assert "Done 3000 runs" in done.stderr, tail
    assert not (tmp_path / "findings").exists(), [p.read_text() for p in (tmp_path / "findings").iterdir()]
