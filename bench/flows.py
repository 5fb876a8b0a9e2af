"""``python -m bench.flows``: how many connections' flows one agent records per second.

Each connection is what the proxies record: a start flow and an end flow (bytes, duration), with the
Prometheus series of both reporters updated, into a ring of the agent's default size. Endpoints cycle
over 1,000 workloads so the metric series are realistic. Prints connections/s and flows/s.
"""

from __future__ import annotations

import statistics
import sys
import time

from agent.telemetry.metrics import Metrics
from agent.telemetry.recorder import Endpoint, FlowRecorder

WORKLOADS = 1000
CONNECTIONS = 50_000
RUNS = 5


def endpoints() -> list[Endpoint]:
    return [Endpoint(f"10.{i // 250}.{i % 250}.1", 8080, identity=f"spiffe://cluster.local/ns/ns{i % 50}/sa/app{i}",
                     namespace=f"ns{i % 50}", pod_name=f"app{i}-0", labels={"app": f"app{i}", "version": "v1"},
                     workload=f"app{i}") for i in range(WORKLOADS)]


def run_once(recorder: FlowRecorder, eps: list[Endpoint]) -> float:
    start = time.perf_counter()
    for i in range(CONNECTIONS):
        src, dst = eps[i % WORKLOADS], eps[(i * 7 + 1) % WORKLOADS]
        handle = recorder.start(direction="EGRESS", reporter="source", source=src, destination=dst, mtls=True)
        handle.end(1024, 1024, "closed")
    return CONNECTIONS / (time.perf_counter() - start)


def main() -> int:
    eps = endpoints()
    recorder = FlowRecorder("bench-node", 4096, Metrics())
    run_once(recorder, eps)  # warm: metric series exist
    rates = [run_once(recorder, eps) for _ in range(RUNS)]
    rate = statistics.median(rates)
    print(f"flows: {rate:,.0f} connections/s recorded = {2 * rate:,.0f} flows/s (start + end, metrics of "
          f"{WORKLOADS} workloads, ring 4096; median of {RUNS} x {CONNECTIONS:,}; range "
          f"{min(rates):,.0f}-{max(rates):,.0f} connections/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
