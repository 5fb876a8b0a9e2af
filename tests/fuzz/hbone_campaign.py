"""``make fuzz``: a bounded campaign against the HBONE protocol layer and server, with a report.

    python -m tests.fuzz.hbone_campaign [--inputs N] [--workers W] [--sessions S] [--concurrency C] [--seed K]

1. ``--inputs`` protocol-layer inputs under atheris (``tests.fuzz.protocol_atheris``), split over
   ``--workers`` libFuzzer processes sharing one corpus;
2. ``--sessions`` hostile socket sessions against ``ambit hbone serve`` while a legitimate client works
   (``tests.fuzz.socket_campaign``).

Prints inputs, rate, coverage, findings, the server's memory and fds, and the legitimate client's
quiet and under-attack latencies; exits 1 if anything was found.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.fuzz import socket_campaign


def protocol_campaign(inputs: int, workers: int, seed: int, corpus: Path, findings: Path) -> list[str]:
    corpus.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HBONE_FUZZ_FINDINGS=str(findings))
    share = [inputs // workers + (1 if i < inputs % workers else 0) for i in range(workers)]
    start = time.perf_counter()
    logs = [findings.parent / f"worker-{i}.log" for i in range(workers)]
    procs = []
    for i, (n, log) in enumerate(zip(share, logs, strict=True)):
        with open(log, "w") as out:  # a file, not a pipe: a worker must never block on its own output
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "tests.fuzz.protocol_atheris", f"-runs={n}", f"-seed={seed + i}",
                 "-max_len=4096", "-timeout=30", "-rss_limit_mb=3072", "-print_final_stats=1", str(corpus)],
                env=env, stdout=subprocess.DEVNULL, stderr=out))
    runs, cov, rss, crashed = 0, 0, 0, []
    for proc, log in zip(procs, logs, strict=True):
        proc.wait()
        err = log.read_text(errors="replace")
        done = re.search(r"Done (\d+) runs", err)
        runs += int(done.group(1)) if done else 0
        cov = max([cov, *(int(c) for c in re.findall(r"cov: (\d+)", err))])
        rss = max([rss, *(int(r) for r in re.findall(r"rss: (\d+)Mb", err))])
        if proc.returncode != 0 or not done:
            crashed.append(f"worker exited {proc.returncode}: {err.strip().splitlines()[-3:]}")
    seconds = time.perf_counter() - start
    found = sorted(findings.glob("*.txt")) if findings.exists() else []
    print(f"protocol layer: {runs} inputs in {seconds:.0f} s ({runs / seconds:.0f}/s) over {workers} workers;"
          f" coverage {cov} edges, corpus {len(list(corpus.iterdir()))} inputs, peak RSS {rss} MiB per worker;"
          f" {len(found)} findings")
    problems = [f.read_text().splitlines()[0] for f in found] + crashed
    if runs < inputs:
        problems.append(f"only {runs} of {inputs} inputs ran")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz.hbone_campaign", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sessions", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--corpus", type=Path, help="keep the protocol corpus here (default: a temporary dir)")
    args = parser.parse_args(argv)
    problems: list[str] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hbone-fuzz-") as tmp:
        if args.inputs:
            problems += protocol_campaign(args.inputs, args.workers, args.seed, args.corpus or Path(tmp, "corpus"),
                                          Path(tmp, "findings"))
            for f in sorted(Path(tmp, "findings").glob("*.txt")):
                print(f"--- {f.name}\n{f.read_text()[:3000]}")
        if args.sessions:
            report = socket_campaign.run(args.sessions, args.concurrency, args.seed,
                                         progress=lambda line: print(line, flush=True))
            print("\n".join(report.lines()))
            problems += report.findings
    print(f"campaign: {time.perf_counter() - started:.0f} s; findings: {len(problems)}")
    for p in problems:
        print(f"  FINDING: {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
