"""``python -m bench.policy``: the L4 policy engine's cost per decision and per update.

Builds a mesh of 10,000 workloads in 100 namespaces (20 apps of 5 pods each per namespace) and 1,000
AuthorizationPolicies of the kinds clusters carry (namespace-wide ALLOWs, per-app ALLOWs by principal and
port, DENYs on admin ports and bad sources, a few mesh-wide ones in the root namespace, some with HTTP
attributes) plus PeerAuthentications (mesh STRICT, PERMISSIVE namespaces, per-workload port exceptions).
Then times ``update()`` for the whole set and ``evaluate()`` for random connections (mostly mTLS, some
plaintext, some from outside), each call timed alone, the timer's own cost subtracted, in two views:

* node: the destinations are the workloads of one node (10,000 workloads over 90 nodes), the sources any
  workload: what one node agent decides, as it decides only for its own pods;
* mesh: the destinations are any of the 10,000 workloads, a working set no agent has, which mostly
  measures how this machine copes with data that is never in the CPU caches.

It waits (a minute at most) for other processes to leave the CPUs alone, and reports how busy they kept
them during the measurement.
"""

from __future__ import annotations

import argparse
import gc
import logging
import random
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from agent.policy import Peer, PolicyEngine, Target
from bench.harness import Background, LoadMeter, wait_until_quiet

ROOT = "istio-system"
PORTS = (8080, 9090, 9091, 15020, 80)


@dataclass(frozen=True)
class Workload:
    namespace: str
    app: str
    labels: dict[str, str]
    ip: str

    @property
    def principal(self) -> str:
        return f"cluster.local/ns/{self.namespace}/sa/{self.app}"


def workloads(namespaces: int, apps: int, pods: int) -> list[Workload]:
    out = []
    for n in range(namespaces):
        for a in range(apps):
            for p in range(pods):
                version = "v1" if p < pods - 1 else "v2"
                labels = {"app": f"app-{a}", "version": version, "pod-template-hash": f"h{n}x{a}{version}",
                          "tier": ("db" if a % 10 == 0 else "web")}
                ip = f"10.{n // 250}.{n % 250}.{a * pods + p + 1}"
                out.append(Workload(f"ns-{n:03d}", f"app-{a}", labels, ip))
    return out


def _obj(kind: str, namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "security.istio.io/v1", "kind": kind, "metadata": {"namespace": namespace, "name": name},
            "spec": spec}


def policies(namespaces: int, apps: int, total: int, rng: random.Random) -> list[dict[str, Any]]:
    """``total`` AuthorizationPolicies (10 mesh-wide, the rest spread over the namespaces) and the
    PeerAuthentications."""
    ap = "AuthorizationPolicy"
    out = [
        _obj(ap, ROOT, "deny-blocked-namespaces", {"action": "DENY", "rules": [
            {"from": [{"source": {"namespaces": ["blocked-*", "*-quarantine"]}}]}]}),
        _obj(ap, ROOT, "deny-bogons", {"action": "DENY", "rules": [
            {"from": [{"source": {"ipBlocks": ["192.0.2.0/24", "198.51.100.0/24", "203.0.113.7"]}}]}]}),
        _obj(ap, ROOT, "deny-admin-from-outside", {"action": "DENY", "rules": [
            {"from": [{"source": {"notIpBlocks": ["10.0.0.0/8"]}}], "to": [{"operation": {"ports": ["15020"]}}]}]}),
        _obj(ap, ROOT, "db-only-from-mesh", {"selector": {"matchLabels": {"tier": "db"}}, "action": "DENY", "rules": [
            {"from": [{"source": {"notPrincipals": ["*"]}}]}]}),
        _obj(ap, ROOT, "deny-debug-methods", {"action": "DENY", "rules": [
            {"to": [{"operation": {"ports": ["8443"], "methods": ["TRACE", "DEBUG"]}}]}]}),
    ]
    out += [_obj(ap, ROOT, f"deny-legacy-{i}", {"action": "DENY", "rules": [
        {"from": [{"source": {"principals": [f"cluster.local/ns/legacy-{i}/sa/*"]}}],
         "when": [{"key": "destination.port", "values": ["9090"]}]}]}) for i in range(10 - len(out))]
    per_namespace = (total - len(out)) // namespaces
    extra = (total - len(out)) % namespaces
    for n in range(namespaces):
        ns = f"ns-{n:03d}"
        friends = [f"ns-{(n + d) % namespaces:03d}" for d in (1, 2)]
        mine: list[dict[str, Any]] = [
            _obj(ap, ns, "allow-namespace", {"rules": [
                {"from": [{"source": {"namespaces": [ns, "istio-system", "ingress-*"]}}]}]}),
            _obj(ap, ns, "deny-admin-port", {"action": "DENY", "rules": [
                {"from": [{"source": {"notNamespaces": [ns]}}], "to": [{"operation": {"ports": ["9091"]}}]}]}),
            _obj(ap, ns, "allow-probes", {"rules": [
                {"from": [{"source": {"ipBlocks": ["169.254.7.127/32"]}}],
                 "to": [{"operation": {"ports": ["15020"]}}]}]}),
        ]
        for i in range(per_namespace + (1 if n < extra else 0) - len(mine)):
            a = rng.randrange(apps)
            callers = [f"cluster.local/ns/{friends[k % 2]}/sa/app-{rng.randrange(apps)}" for k in range(3)]
            rules: list[dict[str, Any]] = [
                {"from": [{"source": {"principals": callers}}], "to": [{"operation": {"ports": ["8080", "9090"]}}]},
                {"from": [{"source": {"serviceAccounts": [f"{friends[0]}/app-{(a + 1) % apps}"]}}],
                 "when": [{"key": "source.ip", "values": ["10.0.0.0/8"]}]},
            ]
            if i % 4 == 3:
                rules.append({"to": [{"operation": {"methods": ["GET"], "paths": ["/healthz"]}}]})  # L7: never here
            mine.append(_obj(ap, ns, f"allow-app-{a}-{i}", {"selector": {"matchLabels": {"app": f"app-{a}"}},
                                                              "rules": rules}))
        out += mine
    out = out[:total]
    pa = "PeerAuthentication"
    out.append(_obj(pa, ROOT, "default", {"mtls": {"mode": "STRICT"}}))
    for n in range(0, namespaces, 10):
        out.append(_obj(pa, f"ns-{n:03d}", "permissive", {"mtls": {"mode": "PERMISSIVE"}}))
    for n in range(5, namespaces, 10):
        out.append(_obj(pa, f"ns-{n:03d}", "metrics-plaintext", {
            "selector": {"matchLabels": {"app": "app-0"}}, "portLevelMtls": {"15020": {"mode": "PERMISSIVE"}}}))
    return out


Connection = tuple[str | None, str | None, str, Workload, int]  # peer principal, namespace, IP; target, port


def connections(mesh: list[Workload], destinations: list[Workload], count: int,
                rng: random.Random) -> list[Connection]:
    """Random connections to ``destinations``: 90% mTLS from a workload (often of the same or a nearby
    namespace), 5% plaintext, 5% from outside the mesh."""
    by_namespace: dict[str, list[Workload]] = {}
    for w in mesh:
        by_namespace.setdefault(w.namespace, []).append(w)
    names = sorted(by_namespace)
    out: list[Connection] = []
    for _ in range(count):
        target, port = rng.choice(destinations), rng.choice(PORTS)
        roll = rng.random()
        if roll < 0.05:
            out.append((None, None, f"10.250.{rng.randrange(250)}.{rng.randrange(1, 250)}", target, port))
        elif roll < 0.10:
            ns = f"blocked-{rng.randrange(5)}"
            out.append((f"cluster.local/ns/{ns}/sa/x", ns, f"192.0.2.{rng.randrange(1, 250)}", target, port))
        else:
            i = names.index(target.namespace)
            w = rng.choice(by_namespace[names[(i + rng.choice((0, 0, 1, 2, 7))) % len(names)]])
            out.append((w.principal, w.namespace, w.ip, target, port))
    return out


def _fresh(text: str) -> str:
    """A new string object equal to ``text``, as a connection's handshake and address produce."""
    return (text + ".")[:-1]


def _percentiles(samples: list[int]) -> dict[str, float]:
    ordered = sorted(samples)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000

    return {"p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "p99.9": at(0.999), "max": ordered[-1] / 1000}


def _timer_cost() -> int:
    clock = time.perf_counter_ns
    costs = []
    for _ in range(20_000):
        t0 = clock()
        costs.append(clock() - t0)
    return sorted(costs)[len(costs) // 2]


def _timed_pass(engine: PolicyEngine, calls: list[Connection], timer: int) -> tuple[list[int], Counter[bool]]:
    """Per-call times (ns) of one pass over ``calls``, and the verdicts. Each call gets a Peer and a Target
    built just before it, from new strings for what a connection brings (identity, addresses) and the
    workload's own namespace and labels objects, as the agent builds them."""
    clock, evaluate = time.perf_counter_ns, engine.evaluate
    times, verdicts = [], Counter[bool]()
    gc.collect()
    gc.disable()
    try:
        for principal, namespace, ip, w, port in calls:
            peer = Peer(principal and _fresh(principal), namespace and _fresh(namespace), _fresh(ip))
            target = Target(w.namespace, w.labels, _fresh(w.ip), port)
            t0 = clock()
            decision = evaluate(peer, target)
            times.append(clock() - t0 - timer)
            verdicts[decision.allowed] += 1
    finally:
        gc.enable()
    return times, verdicts


@dataclass
class View:
    targets: int
    first: dict[str, float]  # percentiles of the first pass after an update (caches filling)
    runs: list[tuple[dict[str, float], Background]]  # warm passes, with how busy the machine was
    verdicts: Counter[bool]


def measure(objs: list[dict[str, Any]], calls: list[Connection], targets: int, runs: int, timer: int) -> View:
    engine = PolicyEngine(ROOT)
    engine.update(objs)
    first, verdicts = _timed_pass(engine, calls, timer)
    warm = []
    for _ in range(runs):
        meter = LoadMeter()
        times, verdicts = _timed_pass(engine, calls, timer)
        warm.append((_percentiles(times), meter.stop()))
    return View(targets, _percentiles(first), warm, verdicts)


def _line(label: str, p: dict[str, float], extra: str = "") -> str:
    return f"    {label:26s} " + "  ".join(f"{k} {v:6.2f}" for k, v in p.items()) + extra


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.policy", description=__doc__.splitlines()[0])
    parser.add_argument("--namespaces", type=int, default=100)
    parser.add_argument("--apps", type=int, default=20, help="apps per namespace")
    parser.add_argument("--pods", type=int, default=5, help="pods per app")
    parser.add_argument("--policies", type=int, default=1000, help="AuthorizationPolicies")
    parser.add_argument("--nodes", type=int, default=90, help="nodes the workloads are spread over")
    parser.add_argument("--evaluations", type=int, default=100_000, help="connections per pass")
    parser.add_argument("--runs", type=int, default=5, help="warm passes per view")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # the engine's notes on HTTP attributes would flood the output

    rng = random.Random(args.seed)
    mesh = workloads(args.namespaces, args.apps, args.pods)
    objs = policies(args.namespaces, args.apps, args.policies, rng)
    node = [w for i, w in enumerate(mesh) if i % args.nodes == 0]
    views = {"node": (connections(mesh, node, args.evaluations, rng), len(node)),
             "mesh": (connections(mesh, mesh, args.evaluations, rng), len(mesh))}

    wait_until_quiet(60)
    updates, unchanged = [], []
    for _ in range(5):
        engine = PolicyEngine(ROOT)
        t0 = time.perf_counter()
        errors = engine.update(objs)
        updates.append(time.perf_counter() - t0)
        if errors:
            raise SystemExit("\n".join(map(str, errors)))
        t0 = time.perf_counter()
        engine.update(objs)
        unchanged.append(time.perf_counter() - t0)
    timer = _timer_cost()
    results = {name: measure(objs, calls, targets, args.runs, timer) for name, (calls, targets) in views.items()}

    kinds = Counter(o["kind"] for o in objs)
    print(f"policy engine: {kinds['AuthorizationPolicy']} AuthorizationPolicies, "
          f"{kinds['PeerAuthentication']} PeerAuthentications, {len(mesh)} workloads in {args.namespaces} "
          f"namespaces ({len({(w.namespace, frozenset(w.labels.items())) for w in mesh})} distinct label sets)")
    print(f"update(), whole set: {statistics.median(updates) * 1000:.1f} ms; the same set again: "
          f"{statistics.median(unchanged) * 1000:.1f} ms (medians of {len(updates)})")
    print(f"evaluate(): {args.evaluations} connections per pass, each call timed alone ({timer} ns of timer "
          f"subtracted), microseconds")
    for name, view in results.items():
        allowed, denied = view.verdicts[True], view.verdicts[False]
        print(f"  {name} view: {view.targets} destination workloads x {len(PORTS)} ports, "
              f"{allowed} allowed / {denied} denied")
        print(_line("first pass after update", view.first))
        keys = view.first.keys()
        median = {k: statistics.median(p[k] for p, _ in view.runs) for k in keys}
        busy = statistics.median(b.other for _, b in view.runs)
        steal = statistics.median(b.steal for _, b in view.runs)
        print(_line(f"warm, median of {len(view.runs)} runs", median,
                    f"   (others {busy:.0%}, steal {steal:.0%})"))
        best, background = min(view.runs, key=lambda r: r[0]["p99"])
        print(_line("warm, best run", best, f"   (others {background.other:.0%}, steal {background.steal:.0%})"))


if __name__ == "__main__":
    main()
