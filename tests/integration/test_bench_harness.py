"""The benchmark harness on loopback: one receiver per place, every path measured in bulk and request/response."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.mesh.model import Address
from bench.harness import AFTER, IDLE, UNDER_LOAD, Config, run
from bench.paths import Place, Running


class _ToReceiver:
    """A path with no proxy in front of a receiver at its own place."""

    def __init__(self, name: str, place: Place) -> None:
        self.name, self.description, self.receiver = name, f"to {place.host}", place
        self.targets: list[Address] = []

    def unavailable(self) -> str | None:
        return None

    @contextlib.contextmanager
    def start(self, target: Address, workdir: Path) -> Iterator[Running]:
        self.targets.append(target)
        yield Running(target)


@pytest.mark.timeout(120)
def test_harness_one_receiver_per_place(tmp_path: Path) -> None:
    a, b, c = (_ToReceiver("a", Place()), _ToReceiver("b", Place(None, "127.0.0.2")),
               _ToReceiver("c", Place()))
    cfg = Config(3 << 20, 2, 50, 512, 5, 2, tmp_path, conn_count=40, conn_clients=4, conn_runs=2)
    results = run([a, b, c], cfg, progress=False)
    assert [r.name for r in results] == ["a", "b", "c"]
    assert a.targets == c.targets and a.targets[0][0] == "127.0.0.1" and b.targets[0][0] == "127.0.0.2"
    for r in results:
        assert [x.nbytes for x in r.bulk] == [3 << 20] * 2
        assert [len(x.samples_ns) for x in r.rr] == [50, 50]
        assert [(x.clients, x.connections, x.failed) for x in r.conn] == [(1, 40, 0), (4, 40, 0)] * 2
        assert r.memory == {IDLE: {}, AFTER: {}, UNDER_LOAD: {}}  # no proxy on these paths
    assert sorted(p.name for p in tmp_path.glob("receiver*.log")) == ["receiver-2.log", "receiver.log"]
