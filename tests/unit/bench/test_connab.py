"""bench.connab: connprofile's figures read back, pairs summed up, a run that gives no figures, the base worktree."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from bench.connab import REPO, base_tree, run_once, summary
from bench.connprofile import Figures


def test_figures_written_by_connprofile_read_back_the_same(tmp_path: Path) -> None:
    figures = Figures(947.0, 874.0, 718.0, 1195.5)
    figures.write(tmp_path / "f.json")
    assert Figures.read(tmp_path / "f.json") == figures


def test_a_run_that_gives_no_figures_is_refused_saying_how_it_ended() -> None:
    with pytest.raises(RuntimeError, match=r"gave no figures \(exit 2\): .*invalid choice: 'nowhere'"):
        run_once(REPO, ["--path", "nowhere"])


def test_the_summary_counts_each_figure_in_its_own_direction() -> None:
    base = Figures(900, 900, 700, 1100)
    pairs = [(base, Figures(950, 880, 690, 1000)), (base, Figures(930, 920, 700, 1050)),
             (base, Figures(880, 870, 710, 1200))]
    rate, cpu, p50, p99 = summary(pairs)
    assert "median change    +30.0 " in rate and "better in 2, worse in 1 of 3" in rate
    assert "median change    -20.0 " in cpu and "better in 2, worse in 1 of 3" in cpu
    assert "better in 1, worse in 1 of 3" in p50  # one tie
    assert "median change    -50.0 " in p99 and "better in 2, worse in 1 of 3" in p99


def test_the_base_tree_is_the_revision_with_the_generated_files_and_goes_afterwards() -> None:
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    with base_tree("HEAD") as tree:
        assert subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip() == head
        generated = sorted(p.relative_to(REPO) for p in REPO.glob("agent/**/*_pb2.py"))
        assert generated and all((tree / p).is_file() for p in generated)
    assert not tree.exists()
    worktrees = subprocess.run(["git", "-C", str(REPO), "worktree", "list"], capture_output=True, text=True,
                               check=True).stdout
    assert str(tree) not in worktrees
