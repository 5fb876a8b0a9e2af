"""RSS and PSS of processes from /proc/<pid>/smaps_rollup, children included, and the peak of them while
a block runs: measured on a real child process that allocates and frees 64 MiB on request."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from bench.procs import Memory, MemoryPeak, memory

SIZE = 64 << 20
# Waits for a line, allocates and touches SIZE bytes (a fresh mmap), says so; waits again, frees, says so.
_CHILD = f"""
import sys
import time
sys.stdout.write("ready\\n"); sys.stdout.flush()
sys.stdin.readline()
block = bytearray({SIZE})
for i in range(0, len(block), 4096):
    block[i] = 1
sys.stdout.write("allocated\\n"); sys.stdout.flush()
sys.stdin.readline()
del block
sys.stdout.write("freed\\n"); sys.stdout.flush()
sys.stdin.readline()
"""


@pytest.fixture
def child() -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen([sys.executable, "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        yield proc
    finally:
        proc.kill()
        proc.wait(10)


def _step(proc: subprocess.Popen[str], expect: str) -> None:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("\n")
    proc.stdin.flush()
    assert proc.stdout.readline() == expect + "\n"


@pytest.mark.timeout(60)
def test_memory_of_a_process_and_its_children(child: subprocess.Popen[str]) -> None:
    before = memory(child.pid)
    assert 0 < before.pss <= before.rss < SIZE
    ours_before = memory(os.getpid())
    _step(child, "allocated")
    grown = memory(child.pid)
    assert grown.rss - before.rss >= SIZE * 0.95 and grown.pss - before.pss >= SIZE * 0.95
    assert memory(os.getpid()).pss - ours_before.pss >= SIZE * 0.9  # the child counts in its parent's tree
    assert memory(2 ** 22 + 1) == Memory()  # above pid_max's largest value: no such process


@pytest.mark.timeout(60)
def test_peak_while_a_block_runs(child: subprocess.Popen[str]) -> None:
    with MemoryPeak({"child": child.pid}, interval=0.02) as peak:
        _step(child, "allocated")
        time.sleep(0.3)  # some 15 sampling intervals
        _step(child, "freed")
    now = memory(child.pid)
    assert now.rss < SIZE  # freed: neither the last sample nor the first one held the block
    assert peak.peak["child"].rss > SIZE and peak.peak["child"].pss > SIZE, "the sampler saw the allocation"
    with MemoryPeak({}) as nothing:
        pass
    assert nothing.peak == {}


def test_memory_arithmetic() -> None:
    assert Memory(1, 2) + Memory(10, 20) == Memory(11, 22)
    assert Memory(5, 1).peak(Memory(3, 4)) == Memory(5, 4)
