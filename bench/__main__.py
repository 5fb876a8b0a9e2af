"""``python -m bench``: direct TCP vs Ambit vs Envoy; bulk throughput, request/response latency, new
connections per second with their set-up latency, and the proxies' CPU and memory.

Two path sets, measured one after the other in one run (``--sets`` picks): ``loopback`` (every process in
this network namespace) and ``lab`` (between a pod on node 1 and a pod on node 2 of an ``ambit lab`` made
for the run and removed after it; needs root; it adds the ``ambit-svc`` path, through a Service VIP, and the
``hbone`` path, the tunnel library alone between the same nodes, to tell what the agents add to it). A
full-size run (>= 1 GiB bulk, >= 10,000 exchanges, >= 2,000 connections per connection run) rewrites each
measured set's generated section of BENCHMARKS.md; a reduced run only prints, unless ``--write`` is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
import signal
import sys
import tempfile
import types
from collections.abc import Callable
from pathlib import Path

from bench.harness import GIB, Config, PathResult, kept_unless_done, run, wait_until_quiet
from bench.lab import (
    LabAmbitPath,
    LabAmbitServicePath,
    LabDirectPath,
    LabEnvoyPath,
    LabHbonePath,
    bench_lab,
    lab_unavailable,
)
from bench.paths import AmbitPath, BenchPath, DirectPath, EnvoyPath, MeshCerts
from bench.report import (
    LAB_SET,
    LOOPBACK_SET,
    SetInfo,
    background,
    findings,
    machine,
    section,
    tables,
    write_markdown,
)

ROOT = Path(__file__).resolve().parent.parent
FULL_BULK = GIB
FULL_RR = 10_000
FULL_CONN = 2000
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
SETS = ("loopback", "lab")
PATHS = ("direct", "ambit", "ambit-svc", "hbone", "envoy")
LAB_ONLY = {"ambit-svc": "it goes through a Service VIP, and only the lab's agents resolve Services",
            "hbone": "on loopback the ambit path is the tunnel library alone already"}


def parse_size(text: str) -> int:
    """``1G``, ``512M``, ``1GiB``, ``1073741824`` -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 1G, 256M)")
    n = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if n <= 0:
        raise argparse.ArgumentTypeError("size must be positive")
    return n


def _positive(text: str) -> int:
    n = int(text)
    if n <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return n


def parse_sets(text: str) -> list[str]:
    """``loopback,lab`` -> the sets in the order given (each once)."""
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in SETS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown set(s) {unknown}; choose from {', '.join(SETS)}")
    return names


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        n = int(text)
        if n < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}")
        return n
    return parse


def _sigterm(signum: int, frame: types.FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwind: every context manager stops its processes, the lab comes down


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--bulk-size", type=parse_size, default=FULL_BULK,
                    help="bytes per bulk stream (default 1G)")
    ap.add_argument("--runs", type=_positive, default=3, help="bulk runs per path; the median is reported")
    ap.add_argument("--rr-count", type=_positive, default=FULL_RR, help="measured exchanges per rr run")
    ap.add_argument("--rr-size", type=_positive, default=1024, help="request and response size in bytes")
    ap.add_argument("--rr-warmup", type=int, default=200, help="unmeasured exchanges before measuring")
    ap.add_argument("--rr-runs", type=_positive, default=5,
                    help="rr runs per path (interleaved); the median of the runs' percentiles is reported")
    ap.add_argument("--conn-count", type=_positive, default=FULL_CONN,
                    help="connections per connection run (connect, --conn-size bytes each way, close)")
    ap.add_argument("--conn-concurrency", type=_at_least(2), default=50,
                    help="clients at once in the concurrent connection runs (the sequential runs use one)")
    ap.add_argument("--conn-size", type=_positive, default=100, help="bytes each way on every connection")
    ap.add_argument("--conn-runs", type=_at_least(0), default=3,
                    help="connection runs per path, each mode (interleaved); 0: no connection workload")
    ap.add_argument("--sets", type=parse_sets, default=list(SETS),
                    help="comma-separated path sets: loopback (all processes here, over loopback) and lab "
                         "(pod on node 1 -> pod on node 2 of an `ambit lab` made for the run; needs root); "
                         "default: both, loopback first")
    ap.add_argument("--paths", default=",".join(PATHS),
                    help=f"comma-separated subset of {','.join(PATHS)} (in every set; ambit-svc and hbone in the "
                         "lab set only)")
    ap.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    ap.add_argument("--write", action=argparse.BooleanOptionalAction, default=None,
                    help="update --output (default: only for a full-size run)")
    ap.add_argument("--quiet-wait", type=float, default=120.0,
                    help="seconds to wait at most for other processes to leave the CPUs alone (0: don't)")
    ap.add_argument("--max-other-load", type=float, default=0.15,
                    help="measure a run again when other processes used more than this share of the CPUs")
    ap.add_argument("--retries", type=int, default=3, help="at most this many re-measurements per run")
    ap.add_argument("--envoy-buffer-limit", type=parse_size, default=None,
                    help="Envoy per_connection_buffer_limit_bytes (default: Envoy's own, 1 MiB)")
    ap.add_argument("--keep-workdir", action="store_true", help="keep configs, certificates and logs")
    return ap


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _report(results: list[PathResult], cfg: Config, args: argparse.Namespace, command: str,
            which: SetInfo) -> None:
    print(f"\n{which.title.replace('Latest ', '').capitalize()} ({which.where}):\n")
    print("\n\n".join(tables(results, cfg)))
    print()
    for line in findings(results, cfg, which):
        print(line)
    print(background(results))
    full = (cfg.bulk_bytes >= FULL_BULK and cfg.rr_count >= FULL_RR and cfg.conn_count >= FULL_CONN
            and cfg.conn_runs > 0)
    write = full if args.write is None else args.write
    if write:
        write_markdown(args.output, section(results, cfg, command, machine(), which), which)
        print(f"\nwrote its section of {args.output}", flush=True)
    elif args.write is None:
        print(f"\n(reduced run: {args.output} left unchanged; pass --write to update it)", flush=True)


def _loopback_paths(names: list[str], certs: MeshCerts, envoy_buffer_limit: int | None,
                    say_skipped: bool) -> list[BenchPath]:
    """The loopback set's paths among ``names``; the lab-only ones are skipped with a note."""
    known: dict[str, BenchPath] = {"direct": DirectPath(), "ambit": AmbitPath(certs),
                                   "envoy": EnvoyPath(certs, envoy_buffer_limit)}
    for n in names:
        if n in LAB_ONLY and say_skipped:
            _say(f"loopback set: path {n} skipped ({LAB_ONLY[n]})")
    return [known[n] for n in names if n in known]


def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    signal.signal(signal.SIGHUP, _sigterm)

    sets: list[str] = list(args.sets)
    if "lab" in sets and (why := lab_unavailable()):
        _say(f"lab set skipped: {why}")
        sets.remove("lab")
        if not sets:
            return 2
    certs = MeshCerts.create()
    names = list(dict.fromkeys(n.strip() for n in args.paths.split(",") if n.strip()))
    unknown = [n for n in names if n not in PATHS]
    if unknown or not names:
        ap.error(f"unknown path(s) {unknown}; choose from {', '.join(PATHS)}")
    paths = _loopback_paths(names, certs, args.envoy_buffer_limit, "loopback" in sets)
    if not paths and "loopback" in sets:
        _say("loopback set skipped: none of its paths was asked for")
        sets.remove("loopback")
        if not sets:
            return 2
    missing = [(p.name, why) for p in paths if (why := p.unavailable())]
    if missing:
        for name, why in missing:
            print(f"path {name!r} cannot run: {why}", file=sys.stderr)
        runnable = ",".join(p.name for p in paths if p.unavailable() is None)
        print(f"(run a subset with --paths, e.g. --paths {runnable})", file=sys.stderr)
        return 2

    workdir = Path(tempfile.mkdtemp(prefix="ambit-bench-"))
    cfg = Config(args.bulk_size, args.runs, args.rr_count, args.rr_size, args.rr_warmup, args.rr_runs,
                 workdir, args.max_other_load, args.retries, max(args.quiet_wait, 1.0),
                 args.conn_count, args.conn_concurrency, args.conn_runs, args.conn_size)
    command = shlex.join(["python", "-m", "bench", *(sys.argv[1:] if argv is None else argv)])
    with kept_unless_done(workdir, args.keep_workdir, _say):
        if "loopback" in sets:
            _say("== loopback set ==")
            if args.quiet_wait > 0:
                wait_until_quiet(args.quiet_wait, say=_say)
            results = run(paths, dataclasses.replace(cfg, workdir=workdir / "loopback"))
            _report(results, cfg, args, command, LOOPBACK_SET)
        if "lab" in sets:
            _say("== lab set ==")
            with bench_lab(workdir / "lab" / "lab-logs", _say) as lab:
                lab_known: dict[str, BenchPath] = {
                    "direct": LabDirectPath(lab), "ambit": LabAmbitPath(lab), "ambit-svc": LabAmbitServicePath(lab),
                    "hbone": LabHbonePath(lab, certs), "envoy": LabEnvoyPath(lab, certs, args.envoy_buffer_limit)}
                if args.quiet_wait > 0:
                    wait_until_quiet(args.quiet_wait, say=_say)
                results = run([lab_known[n] for n in names], dataclasses.replace(cfg, workdir=workdir / "lab"))
            _report(results, cfg, args, command, LAB_SET)
    return 0

if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # everything was stopped and the lab removed on the way out
        print("interrupted", file=sys.stderr)
        sys.exit(130)
