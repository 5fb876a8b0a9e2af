"""Alternate a base revision and the working tree on one connection workload: ``python -m bench.connab --base REV``.

On this machine (2 vCPU, shared) a path's connection rate drifts by ±10 % within minutes, so one run of each version
cannot show a 5 % step. This runs ``python -m bench.connprofile`` (with the arguments after ``--``) for the base
revision, checked out in a detached git worktree made for the run, and for the working tree, alternately ``--pairs``
times (the base first in odd pairs, the working tree first in even ones), and prints every run and, per figure, the
median of the pairs' differences and how many pairs went each way: connections/s, proxy CPU per connection (client +
server, over all rounds), and the set-up p50 and p99 (the median round's), as ``connprofile --figures`` writes them:
the base revision must have that option (any from the one that added this tool on). Root only (the lab needs it).

    python -m bench.connab --base HEAD --pairs 4 -- --path ambit --clients 1 --count 3000 --rounds 2
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from bench.connprofile import Figures

REPO = Path(__file__).resolve().parent.parent
# Files the build generates and git ignores, which a checkout of another revision does not have.
GENERATED = ("*_pb2.py", "*_pb2_grpc.py", "*_pb2.pyi")
FIELDS = (("connections/s", "per_second", True), ("proxy CPU us", "cpu_us", False), ("set-up p50 us", "p50_us", False),
          ("set-up p99 us", "p99_us", False))  # (name, attribute of Figures, higher is better)


def row(f: Figures) -> str:
    return f"{f.per_second:6.0f}/s  CPU {f.cpu_us:5.0f} us  p50 {f.p50_us:5.0f} us  p99 {f.p99_us:5.0f} us"


def summary(pairs: Sequence[tuple[Figures, Figures]]) -> list[str]:
    """Per figure: the median difference (working tree - base) over the pairs, and how many pairs the working tree
    won, lost or tied."""
    lines = []
    for name, attribute, higher_better in FIELDS:
        deltas = [getattr(new, attribute) - getattr(base, attribute) for base, new in pairs]
        better = sum(1 for d in deltas if (d > 0) == higher_better and d != 0)
        worse = sum(1 for d in deltas if (d < 0) == higher_better and d != 0)
        lines.append(f"{name:14s} median change {statistics.median(deltas):+8.1f}   working tree better in {better},"
                     f" worse in {worse} of {len(pairs)} pairs")
    return lines


@contextlib.contextmanager
def base_tree(revision: str) -> Iterator[Path]:
    """``revision`` checked out in a detached worktree (with the generated files the working tree has), removed
    afterwards."""
    parent = Path(tempfile.mkdtemp(prefix="ambit-connab-"))
    where = parent / "tree"
    try:
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(where), revision], check=True,
                       stdout=subprocess.DEVNULL)
        try:
            for pattern in GENERATED:
                for source in REPO.glob(f"agent/**/{pattern}"):
                    target = where / source.relative_to(REPO)
                    if not target.exists():
                        shutil.copy2(source, target)
            yield where
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(where)], check=False)
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def run_once(tree: Path, args: Sequence[str]) -> Figures:
    """One connprofile run in ``tree``; RuntimeError with the end of its output when it gives no figures."""
    with tempfile.TemporaryDirectory(prefix="ambit-connab-run-") as tmp:
        figures = Path(tmp) / "figures.json"
        done = subprocess.run([sys.executable, "-m", "bench.connprofile", *args, "--figures", str(figures)],
                              cwd=tree, capture_output=True, text=True, timeout=1200,
                              env={**os.environ, "PYTHONPATH": str(tree)}, check=False)
        if not figures.exists():
            tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
            raise RuntimeError(f"connprofile in {tree} gave no figures (exit {done.returncode}): {' | '.join(tail)}")
        return Figures.read(figures)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.connab", description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="HEAD", help="the revision to compare the working tree with")
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("connprofile", nargs=argparse.REMAINDER, help="-- then bench.connprofile's arguments")
    args = p.parse_args(argv)
    passed = [a for a in args.connprofile if a != "--"]
    pairs: list[tuple[Figures, Figures]] = []
    with base_tree(args.base) as base:
        for i in range(args.pairs):
            order = [("base", base), ("working tree", REPO)]
            if i % 2:
                order.reverse()
            got = {}
            for label, tree in order:
                got[label] = run_once(tree, passed)
                print(f"pair {i + 1} {label:12s} {row(got[label])}", flush=True)
            pairs.append((got["base"], got["working tree"]))
    print("\n".join(summary(pairs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
