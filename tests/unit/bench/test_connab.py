"""bench.connab: reading connprofile's output, summing pairs up, and the base revision's worktree."""

from __future__ import annotations

import subprocess

import pytest

from bench.connab import REPO, Figures, base_tree, parse_run, summary

_CPU = "proxy CPU us/connection: client 443 + server 430"
OUTPUT = f"""\
lab bench-1: up in 1.7s; namespace 'mesh' enrolled
round 1: 3000 connections, 947/s, failed 0, set-up p50 716 us, p99 1156 us; {_CPU}
round 2: 3000 connections, 942/s, failed 0, set-up p50 720 us, p99 1235 us; {_CPU}
client: user 230 us + system 192 us per connection
median 947 connections/s; proxy CPU us/connection over all rounds: client 437 + server 437
"""


def test_a_runs_figures_are_its_summary_and_the_median_of_its_rounds() -> None:
    assert parse_run(OUTPUT) == Figures(947.0, 874.0, 718.0, 1195.5)


def test_output_without_the_figures_is_refused_saying_how_it_ended() -> None:
    with pytest.raises(ValueError, match=r"no round or summary line.*lab failed to start"):
        parse_run("building 2 node(s)\nlab failed to start\n")


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
