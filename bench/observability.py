"""``python -m bench.observability``: what flows and metrics cost the data path, in a lab.

The lab set's Ambit path (pod on node 1 -> pod on node 2, eBPF capture, HBONE) measured with the agents
recording everything (flows, metrics, eBPF events) and with ``--no-telemetry``, in alternating rounds
(on, off, on, off: the agents are restarted between rounds) so drift on the machine spreads over both.
Reports bulk Gbit/s, proxy CPU per GiB and request/response p50/p99 per mode and the cost of telemetry
in percent. Target (issue 5): under 5 % of throughput. Needs root.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from agent.lab import control
from bench.harness import GIB, Config, PathResult, run
from bench.lab import BenchLab, LabAmbitPath, bench_lab, lab_unavailable

NO_TELEMETRY = "--no-telemetry"


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def restart_agents(lab: BenchLab, telemetry: bool) -> None:
    info = lab.info
    info.agent_flags = [f for f in info.agent_flags if f != NO_TELEMETRY] + ([] if telemetry else [NO_TELEMETRY])
    info.save(lab.paths)
    nodes = [node.name for node in info.nodes]
    control.stop_agents(lab.paths, nodes)
    control.start_agents(info, lab.paths, nodes, timeout=60)


def summary(results: list[PathResult]) -> dict[str, float]:
    bulk = [r.gbit_per_s for res in results for r in res.bulk]
    cpu = [sum(r.proxy_cpu.values()) / (r.nbytes / GIB) for res in results for r in res.bulk]
    merged = PathResult("ambit", "", rr=[q for res in results for q in res.rr])
    return {"gbit": statistics.median(bulk), "low": min(bulk), "high": max(bulk), "cpu": statistics.median(cpu),
            "p50": merged.percentile_us(50), "p99": merged.percentile_us(99)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.observability", description=__doc__)
    ap.add_argument("--rounds", type=int, default=2, help="rounds of (on, off)")
    ap.add_argument("--bulk-mib", type=int, default=512)
    ap.add_argument("--rr-count", type=int, default=5000)
    args = ap.parse_args(argv)
    if why := lab_unavailable():
        print(f"bench.observability: {why}; skipped", file=sys.stderr)
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="ambit-bench-obs-"))
    cfg = Config(args.bulk_mib << 20, 2, args.rr_count, 1024, 200, 2, workdir, max_other_load=0.15, retries=2)
    modes: dict[bool, list[PathResult]] = {True: [], False: []}
    with bench_lab(workdir / "lab-logs", _say) as lab:
        for _ in range(args.rounds):
            for telemetry in (True, False):
                _say(f"== agents {'with' if telemetry else 'without'} telemetry ==")
                restart_agents(lab, telemetry)
                modes[telemetry] += run([LabAmbitPath(lab)], cfg, progress=False)
    on, off = summary(modes[True]), summary(modes[False])
    for label, s in (("with telemetry", on), ("without telemetry", off)):
        print(f"observability: {label}: bulk {s['gbit']:.2f} Gbit/s (runs {s['low']:.2f}-{s['high']:.2f}), "
              f"proxy CPU {s['cpu']:.2f} s/GiB, rr p50 {s['p50']:.0f} us, p99 {s['p99']:.0f} us")
    cost = 100 * (1 - on["gbit"] / off["gbit"])
    overlap = on["low"] <= off["high"] and off["low"] <= on["high"]
    verdict = ("within the run-to-run spread: no cost measurable" if overlap or cost <= 0
               else "beyond the spread")
    print(f"observability: cost of telemetry on throughput {cost:+.1f} % ({verdict}), CPU per GiB "
          f"{100 * (on['cpu'] / off['cpu'] - 1):+.1f} %, rr p50 {on['p50'] - off['p50']:+.0f} us; {args.rounds} "
          f"rounds of on/off, {cfg.runs} bulk runs of {args.bulk_mib} MiB and {cfg.rr_runs} x {args.rr_count} "
          f"exchanges per round; target: under 5 % of throughput")
    return 0


if __name__ == "__main__":
    sys.exit(main())
