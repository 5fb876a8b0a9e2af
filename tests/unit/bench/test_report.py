"""The benchmark's own bookkeeping: set selection, the generated sections of BENCHMARKS.md, the targets (the
harness is tests/integration/test_bench_harness.py, the lab set tests/e2e/test_bench_lab.py)."""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import pytest

from bench.__main__ import parse_sets
from bench.harness import GIB, BulkRun, Config, PathResult, RrRun
from bench.report import LAB_SET, LOOPBACK_SET, commit_of, section, targets, write_markdown


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


def test_the_commit_is_marked_changed_by_tracked_edits_but_not_by_the_benchmarks_file(tmp_path: Path) -> None:
    """A run writes BENCHMARKS.md between its two sets: that alone must not mark the code measured as changed."""
    def git(*argv: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *argv], cwd=tmp_path, check=True,
                       capture_output=True)

    git("init", "-q")
    (tmp_path / "BENCHMARKS.md").write_text("# figures\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", ".")
    git("commit", "-qm", "start")
    clean = commit_of(tmp_path)
    assert clean and "uncommitted" not in clean
    (tmp_path / "BENCHMARKS.md").write_text("# figures, rewritten by the run\n")
    (tmp_path / "notes.txt").write_text("untracked\n")
    assert commit_of(tmp_path) == clean
    (tmp_path / "code.py").write_text("x = 2\n")
    assert commit_of(tmp_path) == clean + " (with uncommitted changes)"
