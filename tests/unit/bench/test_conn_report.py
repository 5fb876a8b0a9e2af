"""The connection workload's figures (rates, set-up percentiles, CPU and memory per proxy) and the report
lines built from them: Ambit against Envoy, issue 11's targets, the load client check, ambit-svc against
ambit, and the generated section."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.harness import AFTER, GIB, IDLE, UNDER_LOAD, BulkRun, Config, ConnRun, PathResult, RrRun, nearest_rank
from bench.procs import Memory
from bench.report import (
    LAB_SET,
    LOOPBACK_SET,
    agent_ratios,
    conn_ratios,
    conn_table,
    conn_targets,
    memory_table,
    section,
    service_ratios,
)

MIB = 1 << 20
INFO = {"nproc": "2", "cpu": "cpu", "memory": "1 GiB", "kernel": "6", "python": "3", "envoy": "1.40",
        "commit": "abc", "hbone_sha": "0123"}


def _conn(clients: int, rate: float, p50_us: float, p99_us: float, cpu_us: float = 0.0, n: int = 100,
          client_cpu: float = 0.0, failed: int = 0, peak: dict[str, Memory] | None = None) -> ConnRun:
    """A run of ``n`` connections at ``rate``/s whose nearest-rank p50 and p99 are as given, whose two
    proxies used ``cpu_us`` per connection between them (half each) and whose client kept ``client_cpu`` of
    a CPU busy."""
    samples = [int(p50_us * 1000)] * (n - 2) + [int(p99_us * 1000)] * 2
    proxies = {"client": cpu_us * (n + failed) / 2e6, "server": cpu_us * (n + failed) / 2e6} if cpu_us else {}
    return ConnRun(clients, samples, n / rate, proxies, client_cpu * n / rate, failed, peak_memory=peak or {})


def _path(name: str, rates: tuple[float, float], p99s: tuple[float, float] = (1000, 5000),
          cpu_us: tuple[float, float] = (0, 0), pss_mib: float = 0.0, gbit: float = 4.0,
          rr_us: tuple[float, float] = (200, 400)) -> PathResult:
    r = PathResult(name, f"the {name} path")
    r.bulk = [BulkRun(GIB, GIB * 8 / (gbit * 1e9), {})]
    r.rr = [RrRun([int(rr_us[0] * 1000)] * 98 + [int(rr_us[1] * 1000)] * 2, {}, 0)]
    r.conn = [_conn(1, rates[0], 300, p99s[0], cpu_us[0], client_cpu=0.2),
              _conn(50, rates[1], 3000, p99s[1], cpu_us[1], client_cpu=0.8)]
    if pss_mib:
        mem = {"client": Memory(int(2 * pss_mib * MIB), int(pss_mib * MIB)),
               "server": Memory(int(2 * pss_mib * MIB), int(pss_mib * MIB))}
        r.memory = {IDLE: mem, AFTER: mem, UNDER_LOAD: {k: Memory(m.rss * 2, m.pss * 2) for k, m in mem.items()}}
    return r


def _cfg(tmp: Path, conn_runs: int = 1) -> Config:
    return Config(GIB, 1, 100, 1024, 0, 1, tmp, conn_count=100, conn_clients=50, conn_runs=conn_runs)


def test_nearest_rank() -> None:
    samples = list(range(100, 0, -1))  # 1..100, unsorted
    assert [nearest_rank(samples, q) for q in (0, 1, 50, 99, 99.5, 100)] == [1, 1, 50, 99, 100, 100]
    assert nearest_rank([7], 99) == 7


def test_figures_of_a_path() -> None:
    r = PathResult("ambit", "")
    r.conn = [
        _conn(1, 400, 900, 2000, cpu_us=1000, client_cpu=0.1),
        _conn(1, 500, 700, 3000, cpu_us=1000, client_cpu=0.1),
        _conn(1, 450, 800, 4000, cpu_us=1000, client_cpu=0.1),
        _conn(50, 800, 9000, 30000, cpu_us=500, failed=10, client_cpu=0.3,
              peak={"client": Memory(100, 50), "server": Memory(80, 70)}),
        _conn(50, 600, 9000, 40000, cpu_us=500, client_cpu=0.3, peak={"client": Memory(90, 60)}),
    ]
    assert r.conn_rate(1) == pytest.approx(450) and r.conn_rate(50) == pytest.approx(700)
    assert r.setup_us(1, 50) == 800 and r.setup_us(1, 99) == 3000  # medians over the runs' percentiles
    assert r.setup_us(50, 99) == 35000  # median of two runs: their mean
    cpu = r.cpu_us_per_conn(50)  # failed connections are connections the proxies worked for too
    assert cpu == pytest.approx({"client": 250, "server": 250, "total": 500})
    assert r.client_cpu_share(1) == pytest.approx(0.1) and r.client_cpu_share(50) == pytest.approx(0.3)
    assert r.peak_memory() == {"client": Memory(100, 60), "server": Memory(80, 70)}
    assert r.cpu_us_per_conn(7) == {} and PathResult("direct", "").cpu_us_per_conn(1) == {}


def _results() -> list[PathResult]:
    return [_path("direct", (3000, 8000), (400, 9000)),
            _path("ambit", (400, 900), (2000, 60000), (1200, 900), pss_mib=30),
            _path("ambit-svc", (380, 880), (2100, 61000), (1250, 950), pss_mib=30, gbit=3.9, rr_us=(205, 420)),
            _path("envoy", (500, 1800), (1000, 40000), (600, 300), pss_mib=40)]


def test_ambit_against_envoy_and_the_client_check(tmp_path: Path) -> None:
    assert conn_ratios(_results(), _cfg(tmp_path)) == [
        "Ambit / Envoy connections/s: 0.80 sequential, 0.50 with 50 clients",
        "Ambit / Envoy proxy CPU per connection: 2.00 (1200 us / 600 us) sequential, "
        "3.00 (900 us / 300 us) with 50 clients",
        "Ambit / Envoy set-up p99: 2.00 (2000 us / 1000 us) sequential, 1.50 (60000 us / 40000 us) with 50 clients",
        "Ambit / Envoy PSS of both proxies: idle 0.75, under load 0.75",
        "Load client check: on `direct` the same client made 8000 connections/s with 50 clients using 0.80 of a "
        "CPU (0.20 sequential); the proxied paths reached at most 22% of that rate, their client using at most "
        "0.80 of a CPU, so the client is not what limits them",
    ]
    # Close to direct's rate: not limited by the client only if it had CPU to spare on the proxied path.
    spare = [_path("direct", (3000, 2000)), _path("envoy", (500, 1800), cpu_us=(600, 300))]
    for conn in spare[1].conn:
        conn.client_cpu = 0.3 * conn.seconds
    assert conn_ratios(spare, _cfg(tmp_path))[-1].endswith(
        "reached at most 90% of that rate, their client using at most 0.30 of a CPU, so the client is not what "
        "limits them")
    busy = [_path("direct", (3000, 2000)), _path("envoy", (500, 1800), cpu_us=(600, 300))]
    assert conn_ratios(busy, _cfg(tmp_path))[-1].endswith(
        "reached at most 90% of that rate, their client using at most 0.80 of a CPU, so the client may be part "
        "of what limits them: read their rates with care")


def test_issue_11_targets_met_and_not_met(tmp_path: Path) -> None:
    missed = conn_targets(_results(), _cfg(tmp_path))
    assert missed[:3] == [
        "Target Ambit / Envoy connections/s >= 1.0: 0.80 sequential, 0.50 with 50 clients, NOT met",
        "Target Ambit / Envoy proxy CPU per connection <= 1.0: 2.00 sequential, 3.00 with 50 clients, NOT met",
        "Target Ambit / Envoy set-up p99 <= 1.0: 2.00 sequential, 1.50 with 50 clients, NOT met",
    ]
    assert missed[3].startswith("Target Ambit PSS idle <= 40 MB with 100 enrolled pods: not assessed here")
    assert missed[3].endswith("the agents' PSS idle: client 30.0 MiB (31.5 MB), server 30.0 MiB (31.5 MB)")
    better = [_path("ambit", (600, 2000), (900, 30000), (500, 200)), _path("envoy", (500, 1800), (1000, 40000),
                                                                           (600, 300))]
    met = conn_targets(better, _cfg(tmp_path))
    assert [line.rsplit(", ", 1)[1] for line in met[:3]] == ["met", "met", "met"]
    # one mode missing the target is enough for NOT met
    half = [_path("ambit", (600, 1000), (900, 30000), (500, 200)), better[1]]
    assert conn_targets(half, _cfg(tmp_path))[0].endswith("1.20 sequential, 0.56 with 50 clients, NOT met")
    assert conn_targets(better[:1], _cfg(tmp_path)) == []


def test_service_path_against_the_pod_path(tmp_path: Path) -> None:
    results = _results()
    ambit = results[1]
    ambit.bulk.append(BulkRun(GIB, GIB * 8 / 3.8e9, {}))  # runs 3.8 and 4.0 Gbit/s: ambit-svc's 3.9 is inside
    assert service_ratios(results, _cfg(tmp_path)) == [
        "ambit-svc / ambit bulk throughput: 1.00 (ambit-svc 3.90 Gbit/s, within ambit's runs 3.80-4.00)",
        "ambit-svc / ambit rr p50: 1.02 (ambit-svc 205.0 us, outside ambit's runs 200.0-200.0)",
        "ambit-svc / ambit rr p99: 1.05 (ambit-svc 420.0 us, outside ambit's runs 400.0-400.0)",
        "ambit-svc / ambit connections/s, sequential: 0.95 (ambit-svc 380 connections/s, outside ambit's runs "
        "400-400)",
        "ambit-svc / ambit connections/s, with 50 clients: 0.98 (ambit-svc 880 connections/s, outside ambit's "
        "runs 900-900)",
    ]
    assert len(service_ratios(results, _cfg(tmp_path, conn_runs=0))) == 3  # no connection workload
    assert service_ratios([r for r in results if r.name != "ambit-svc"], _cfg(tmp_path)) == []


def test_what_the_agents_add_to_the_tunnel_library(tmp_path: Path) -> None:
    ambit = _path("ambit", (400, 900), cpu_us=(1200, 500))
    hbone = _path("hbone", (800, 1500), cpu_us=(800, 400))
    envoy = _path("envoy", (1000, 2000), cpu_us=(700, 300))
    assert agent_ratios([ambit, hbone, envoy], _cfg(tmp_path)) == [
        "ambit / hbone (what the agents add to the tunnel library) connections/s: 0.50 sequential, 0.60 with 50 "
        "clients; proxy CPU per connection: 1.50 (+400 us) sequential, 1.25 (+100 us) with 50 clients",
        "hbone / Envoy connections/s: 0.80 sequential, 0.75 with 50 clients; proxy CPU per connection: 1.14 "
        "sequential, 1.33 with 50 clients",
    ]
    assert len(agent_ratios([ambit, hbone], _cfg(tmp_path))) == 1
    assert agent_ratios([ambit, envoy], _cfg(tmp_path)) == []
    assert agent_ratios([ambit, hbone, envoy], _cfg(tmp_path, conn_runs=0)) == []


def test_tables(tmp_path: Path) -> None:
    rows = conn_table(_results(), _cfg(tmp_path)).splitlines()
    assert rows[0].startswith("| path | clients | connections/s (median of 1) |")
    assert len(rows) == 2 + 2 * 4  # header, rule, a row per mode and path
    assert rows[2] == "| direct | 1 | 3000 | 3000-3000 | 300 | 400 | - | 0.20 | 0 |"
    assert rows[3] == "| ambit | 1 | 400 | 400-400 | 300 | 2000 | 1200 (600+600) | 0.20 | 0 |"
    assert rows[9] == "| envoy | 50 | 1800 | 1800-1800 | 3000 | 40000 | 300 (150+150) | 0.80 | 0 |"
    mem = memory_table(_results()).splitlines()
    assert mem[0] == ("| path | proxy | RSS / PSS MiB, idle | RSS / PSS MiB, after bulk and rr "
                      "| RSS / PSS MiB, under load |")
    assert mem[2] == "| ambit | client | 60.0 / 30.0 | 60.0 / 30.0 | 120.0 / 60.0 |"
    assert len(mem) == 2 + 3 * 2  # no row for direct, which has no proxy
    partial = _path("envoy", (1, 1), pss_mib=10)
    del partial.memory[UNDER_LOAD]  # a run without the connection workload
    assert memory_table([partial]).splitlines()[2] == "| envoy | client | 20.0 / 10.0 | 20.0 / 10.0 | - |"
    assert memory_table([_path("direct", (1, 1))]) == ""


def test_section_with_the_connection_workload(tmp_path: Path) -> None:
    lab = section(_results(), _cfg(tmp_path), "python -m bench", INFO, LAB_SET)
    assert "| path | clients | connections/s (median of 1) |" in lab and "RSS / PSS MiB, idle" in lab
    assert "- Connections: 100 per run, each a connect, 100 B each way" in lab
    assert "- Target Ambit / Envoy connections/s >= 1.0: 0.80 sequential, 0.50 with 50 clients, NOT met" in lab
    assert "- ambit-svc / ambit bulk throughput: 0.98 (ambit-svc 3.90 Gbit/s, outside" in lab
    assert "- Load client check:" in lab
    assert "agent/mesh/*.py" in lab and "`ambit-svc`: the ambit-svc path" in lab
    loop = section([r for r in _results() if r.name != "ambit-svc"], _cfg(tmp_path), "c", INFO, LOOPBACK_SET)
    assert "Target" not in loop and "- Ambit / Envoy connections/s: 0.80 sequential" in loop
    assert "- `ambit-svc` is measured in the lab set only" in loop
    quiet = section(_results(), _cfg(tmp_path, conn_runs=0), "c", INFO, LAB_SET)
    assert "connections/s" not in quiet and "- Connections:" not in quiet and "RSS / PSS MiB" in quiet
