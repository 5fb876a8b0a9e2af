"""The memory-per-connection workload's arithmetic and report (bench/conn_memory.py), its arguments, the
open-files limit it raises for everything it starts, and the Envoy configs' lifted circuit breakers."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.conn_memory import PathMemory, _between, _counts, held_after_rounds, ratios, table
from bench.envoy import TlsFiles, client_bootstrap, server_bootstrap
from bench.paths import MeshCerts
from bench.procs import Memory

KIB = 1024
MIB = 1 << 20


def _path(name: str, client_kib: float, server_kib: float, counts: tuple[int, ...] = (1000, 5000)) -> PathMemory:
    """A path whose proxies start at 60 MiB RSS / 40 MiB PSS and grow by the given KiB per open connection (PSS
    by one KiB less, to tell them apart)."""
    idle = {"client": Memory(60 * MIB, 40 * MIB), "server": Memory(60 * MIB, 40 * MIB)}
    grow = {"client": client_kib, "server": server_kib}
    at = {n: {role: Memory(int(m.rss + grow[role] * KIB * n), int(m.pss + (grow[role] - 1) * KIB * n))
              for role, m in idle.items()} for n in counts}
    return PathMemory(name, f"{name} path", idle, at, at[counts[-1]])


def test_kib_per_connection_is_growth_over_idle_divided_by_the_count() -> None:
    r = _path("ambit", 7.0, 7.5)
    assert r.kib_per_connection(1000, "client") == pytest.approx((7.0, 6.0))
    assert r.kib_per_connection(5000, "server") == pytest.approx((7.5, 6.5))


def test_table_has_a_row_per_proxy_with_its_memory_and_kib_per_connection() -> None:
    lines = table([_path("ambit", 7.0, 7.5), _path("envoy", 16.0, 23.0)], (1000, 5000))
    assert lines[0] == ("| path | proxy | RSS / PSS idle (MiB) | at 1,000 | at 5,000 | after closing | "
                        "KiB per connection at 1,000 (RSS / PSS) | KiB per connection at 5,000 (RSS / PSS) |")
    assert len(lines) == 2 + 4
    assert lines[2] == ("| ambit | client | 60.0 / 40.0 | 66.8 / 45.9 | 94.2 / 69.3 | 94.2 / 69.3 | 7.0 / 6.0 "
                        "| 7.0 / 6.0 |")
    assert lines[5].startswith("| envoy | server | 60.0 / 40.0 |")
    assert lines[5].endswith("| 23.0 / 22.0 | 23.0 / 22.0 |")


def test_ratios_put_ambit_over_envoy_per_side_and_count() -> None:
    out = ratios(_path("ambit", 7.0, 7.5), _path("envoy", 15.0, 21.0), (1000, 5000))
    assert out == ["Ambit / Envoy, KiB per connection at 1,000, PSS (RSS): client 0.43x (0.47x), server 0.33x (0.36x)",
                   "Ambit / Envoy, KiB per connection at 5,000, PSS (RSS): client 0.43x (0.47x), server 0.33x (0.36x)"]
    flat = ratios(_path("ambit", 7.0, 7.5), _path("envoy", 0.0, 21.0), (1000,))
    assert "client: Envoy's grew by nothing measurable" in flat[0] and "server 0.33x" in flat[0]


def test_held_after_rounds_lists_each_proxys_memory_after_each_rounds_closing() -> None:
    first = [_path("ambit", 7.0, 7.5, (1000,)), _path("envoy", 16.0, 23.0, (1000,))]
    second = [_path("ambit", 8.0, 7.5, (1000,)), _path("envoy", 16.0, 23.0, (1000,))]
    lines = held_after_rounds([first, second])
    assert lines == ["ambit client, after each round's connections closed: 66.8 / 45.9 -> 67.8 / 46.8",
                     "ambit server, after each round's connections closed: 67.3 / 46.3 -> 67.3 / 46.3",
                     "envoy client, after each round's connections closed: 75.6 / 54.6 -> 75.6 / 54.6",
                     "envoy server, after each round's connections closed: 82.5 / 61.5 -> 82.5 / 61.5"]


@pytest.mark.parametrize("text", ["5000,1000", "1000,1000", "10,1000", "", "1k"])
def test_counts_must_rise_above_the_warm_up(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        _counts(text)


def test_counts_parse() -> None:
    assert _counts("1000,5000") == [1000, 5000]


def test_wave_and_rounds_are_bounded_whole_numbers() -> None:
    parse = _between(1, 10)
    assert parse("10") == 10
    for bad, why in (("0", "must be 1 to 10, not 0"), ("11", "not 11"), ("2.5", "not a whole number")):
        with pytest.raises(argparse.ArgumentTypeError, match=why):
            parse(bad)


CAP_SYS_RESOURCE = 24


def _may_raise_hard_limits() -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> CAP_SYS_RESOURCE & 1)
    return False


def _limits_after_raising(soft: int, hard: int, count: int) -> subprocess.CompletedProcess[str]:
    """In a child process whose open-files limit is (soft, hard): ``raise_open_files(count)``, then the limit a
    process it starts inherits; prints both as JSON."""
    code = ("import json, resource, subprocess, sys\n"
            f"resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard}))\n"
            "from bench.conn_memory import raise_open_files\n"
            f"mine = raise_open_files({count})\n"
            "child = subprocess.run([sys.executable, '-c', 'import resource; "
            "print(list(resource.getrlimit(resource.RLIMIT_NOFILE)))'], capture_output=True, text=True)\n"
            "print(json.dumps([list(mine), json.loads(child.stdout)]))\n")
    return subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[3])


def test_soft_open_files_limit_is_raised_to_the_hard_one_for_everything_started_after() -> None:
    out = _limits_after_raising(256, 8192, 5000)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [[8192, 8192], [8192, 8192]]


def test_a_hard_limit_short_of_the_count_is_raised_or_named() -> None:
    """5,000 connections with a hard limit of 2,048: raised to 6,024 where this process may (CAP_SYS_RESOURCE),
    else a clear error naming the need and the limit."""
    out = _limits_after_raising(256, 2048, 5000)
    if _may_raise_hard_limits():
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == [[6024, 6024], [6024, 6024]]
    else:
        assert out.returncode == 1 and "need an open-files limit of 6024; the hard limit is 2048" in out.stderr


def test_envoy_clusters_take_thousands_of_connections(tmp_path: Path) -> None:
    """Envoy's default circuit breakers (1,024) would refuse the 1,025th open tunnel; both configs lift them."""
    certs = MeshCerts.create()
    tls = TlsFiles.write(tmp_path, "c", certs.client, certs.bundle.roots_pem)
    client = client_bootstrap(listen_port=0, hbone=("127.0.0.1", 1), authority="127.0.0.1:2",
                              expect=certs.server.identity, tls=tls)
    server = server_bootstrap(listen_port=0, target=("127.0.0.1", 2), trust_domain=certs.trust_domain, tls=tls)
    for cfg in (client, server):
        for cluster in cfg["static_resources"]["clusters"]:
            (limits,) = cluster["circuit_breakers"]["thresholds"]
            assert min(limits[k] for k in ("max_connections", "max_pending_requests", "max_requests")) >= 100_000
