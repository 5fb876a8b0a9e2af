"""``python -m bench.store``: the mesh store's cost per event, against rebuilding the whole state.

A synthetic cluster (by default 10,000 pods over 100 namespaces and 20 nodes in 3 zones, half the namespaces
enrolled; 2,000 Services whose selectors pick 25 pods each, so 50,000 endpoints, with named and numeric target
ports, some ``internalTrafficPolicy: Local`` and ``trafficDistribution``; 100 AuthorizationPolicies and a few
PeerAuthentications) is loaded into a ``MeshStore``. Then:

1. each kind of event is applied alone (``store.apply``) many times, each call timed: a pod moving from one
   Service's selector to another's, a pod turning unready or ready, a pod added, a pod deleted, a Service
   added, its selector changed, a Service deleted; against the whole rebuild the agent did before on every
   change (``build_state`` of every object), timed in the same run;
2. the event loop (uvloop, as the agent runs) carries traffic, a loopback echo whose every round trip is timed,
   while another task applies 200 events/s for 5 s: deltas one event per apply; deltas batched as the
   Kubernetes source batches them (everything pending every ``debounce`` s, at most half the time); the
   same batches applied a few events at a time, the loop served in between; and whole rebuilds batched as
   the source batches. The slowest round trip is the longest stall traffic saw; each apply's CPU time is
   the store's own part of it (on a shared machine, other processes' part can be larger).

It waits (a minute at most) for other processes to leave the CPUs alone, and reports how busy they kept them.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import ipaddress
import logging
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import uvloop

from agent.mesh.store import Change, Key, MeshState, MeshStore, build_state
from bench.harness import Background, LoadMeter, wait_until_quiet

Obj = dict[str, Any]
Event = tuple[list[Obj], list[Key]]  # (upserts, deletes), as a source hands them to the store
GROUPS = ("app", "tier", "track", "team", "shard", "stage", "role", "owner")  # selector label keys
ZONES = ("zone-a", "zone-b", "zone-c")
TD = "networking.istio.io/traffic-distribution"
POD_TARGET_US = 1000.0
SERVICE_TARGET_US = 1000.0
STALL_TARGET_MS = 2.0


@dataclass(frozen=True)
class Scale:
    namespaces: int = 100
    nodes: int = 20
    pods: int = 10_000
    services: int = 2_000
    per_service: int = 25  # pods each Service selects

    @property
    def pods_per_namespace(self) -> int:
        return self.pods // self.namespaces

    @property
    def buckets(self) -> int:
        """Services per selector label in a namespace (each picks ``per_service`` of its pods)."""
        return self.pods_per_namespace // self.per_service

    @property
    def groups(self) -> int:
        """Selector labels per namespace: each pod is selected by one Service of each."""
        return self.services // self.namespaces // self.buckets

    def check(self) -> str | None:
        """Why this scale cannot be laid out evenly, or None."""
        if self.pods % self.namespaces or self.services % self.namespaces:
            return "--pods and --services must be multiples of --namespaces"
        if self.pods_per_namespace % self.per_service or self.buckets < 2:
            return "pods per namespace must be a multiple of --per-service, at least twice it"
        if (self.services // self.namespaces) % self.buckets or not 1 <= self.groups <= len(GROUPS):
            return (f"services per namespace must be 1..{len(GROUPS)} times pods per namespace / --per-service "
                    f"({self.buckets})")
        return None


def _ip(base: str, index: int) -> str:
    return str(ipaddress.ip_address(base) + index)


def _ns(n: int) -> str:
    return f"ns-{n:03d}"


class Cluster:
    """The synthetic cluster: its current objects, and events that change them (each updates ``objects``)."""

    def __init__(self, scale: Scale, seed: int) -> None:
        self.scale = scale
        self.rng = random.Random(seed)
        self.objects: dict[Key, Obj] = {}
        self._serial = 0  # resourceVersions, new pods' and Services' numbers
        self._extra_pods: list[Key] = []
        self._extra_services: list[Key] = []
        self._pods: list[Key] = []
        for n in range(scale.nodes):
            self._put({"apiVersion": "v1", "kind": "Node", "metadata": {
                "name": f"node-{n:02d}", "labels": {"topology.kubernetes.io/zone": ZONES[n % len(ZONES)],
                                                    "kubernetes.io/os": "linux"}}})
        for n in range(scale.namespaces):
            self._namespace(n)

    def _put(self, obj: Obj) -> Key:
        meta = obj["metadata"]
        key = (obj["kind"], meta.get("namespace", ""), meta["name"])
        self._serial += 1
        meta["resourceVersion"] = str(self._serial)
        self.objects[key] = obj
        return key

    def _namespace(self, n: int) -> None:
        s, ns = self.scale, _ns(n)
        labels = {"kubernetes.io/metadata.name": ns, **({"istio.io/dataplane-mode": "ambient"} if n % 2 else {})}
        annotations = {TD: "PreferClose"} if n % 10 == 3 else {}
        self._put({"apiVersion": "v1", "kind": "Namespace",
                   "metadata": {"name": ns, "labels": labels, "annotations": annotations}})
        orders = [self.rng.sample(range(s.pods_per_namespace), s.pods_per_namespace) for _ in range(s.groups)]
        for i in range(s.pods_per_namespace):
            labels = {GROUPS[g]: f"{GROUPS[g]}-{orders[g][i] // s.per_service}" for g in range(s.groups)}
            index = n * s.pods_per_namespace + i
            self._pods.append(self._put(self._pod(ns, f"pod-{i:04d}", _ip("10.128.0.1", index),
                                                  f"node-{index % s.nodes:02d}", labels)))
        for g in range(s.groups):
            for b in range(s.buckets):
                self._put(self._service(ns, f"{GROUPS[g]}-{b}", _ip("10.96.0.1", n * 256 + g * s.buckets + b),
                                        {GROUPS[g]: f"{GROUPS[g]}-{b}"}, g * s.buckets + b))
        self._put(_policy("AuthorizationPolicy", ns, "allow-namespace",
                          {"rules": [{"from": [{"source": {"namespaces": [ns, "istio-system"]}}]}]}))
        if n % 10 == 0:
            self._put(_policy("PeerAuthentication", ns, "permissive", {"mtls": {"mode": "PERMISSIVE"}}))

    def _pod(self, ns: str, name: str, ip: str, node: str, labels: dict[str, str], ready: bool = True) -> Obj:
        """A pod as the API server gives it, with the fields a real one carries (they cost in comparisons)."""
        self._serial += 1
        uid = f"{self._serial:08x}-5c1e-4d2b-9b7e-{ip.replace('.', ''):0>12}"
        app = labels.get("app", name)
        status = "True" if ready else "False"
        return {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "uid": uid, "creationTimestamp": "2026-01-01T00:00:00Z",
                         "labels": {**labels, "pod-template-hash": "7d4b9c8f6"},
                         "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-01-01T00:00:00Z"},
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": f"{app}-7d4b9c8f6",
                                              "uid": f"rs-{app}", "controller": True, "blockOwnerDeletion": True}]},
            "spec": {"nodeName": node, "serviceAccountName": app, "restartPolicy": "Always",
                     "containers": [{"name": "app", "image": "registry.example/app:1.4.2",
                                     "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"},
                                               {"name": "metrics", "containerPort": 9090, "protocol": "TCP"}],
                                     "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "192.168.0.10",
                       "startTime": "2026-01-01T00:00:01Z",
                       "conditions": [{"type": t, "status": "True" if t in ("PodScheduled", "Initialized") else status,
                                       "lastTransitionTime": "2026-01-01T00:00:02Z"}
                                      for t in ("Initialized", "Ready", "ContainersReady", "PodScheduled")],
                       "containerStatuses": [{"name": "app", "ready": ready, "restartCount": 0, "started": True,
                                              "image": "registry.example/app:1.4.2",
                                              "containerID": f"containerd://{uid}"}]}}

    def _service(self, ns: str, name: str, vip: str, selector: dict[str, str], number: int) -> Obj:
        spec: Obj = {"type": "ClusterIP", "clusterIP": vip, "clusterIPs": [vip], "ipFamilies": ["IPv4"],
                     "selector": selector, "sessionAffinity": "None",
                     "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"},
                               {"name": "metrics", "port": 9090, "targetPort": 9090, "protocol": "TCP"}]}
        if number % 10 == 9:
            spec["internalTrafficPolicy"] = "Local"
        elif number % 7 == 5:
            spec["trafficDistribution"] = "PreferClose"
        return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns}, "spec": spec}

    # -- events (each returns what a source hands the store, and updates ``objects``) ----------------------------
    def _changed_pod(self) -> tuple[Key, Obj]:
        key = self.rng.choice(self._pods)
        old = self.objects[key]
        return key, {**old, "metadata": {**old["metadata"], "labels": dict(old["metadata"]["labels"])},
                     "status": {**old["status"]}}

    def pod_relabel(self) -> Event:
        """A pod's selector label moves it from one Service to another of its namespace."""
        _key, pod = self._changed_pod()
        group = GROUPS[self.rng.randrange(self.scale.groups)]
        labels = pod["metadata"]["labels"]
        current = int(labels[group].rsplit("-", 1)[1])
        labels[group] = f"{group}-{(current + 1 + self.rng.randrange(self.scale.buckets - 1)) % self.scale.buckets}"
        self._put(pod)
        return [pod], []

    def pod_readiness(self) -> Event:
        """A pod turns unready (or ready again): every Service selecting it changes."""
        _key, pod = self._changed_pod()
        ready = not any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"]["conditions"])
        pod["status"]["conditions"] = [{**c, "status": "True" if ready else "False"} if c["type"] in (
            "Ready", "ContainersReady") else c for c in pod["status"]["conditions"]]
        self._put(pod)
        return [pod], []

    def pod_added(self) -> Event:
        s = self.scale
        n = self.rng.randrange(s.namespaces)
        labels = {GROUPS[g]: f"{GROUPS[g]}-{self.rng.randrange(s.buckets)}" for g in range(s.groups)}
        pod = self._pod(_ns(n), f"extra-{self._serial}", _ip("10.192.0.1", self._serial),
                        f"node-{self.rng.randrange(s.nodes):02d}", labels)
        self._extra_pods.append(self._put(pod))
        return [pod], []

    def pod_deleted(self) -> Event:
        """The oldest pod ``pod_added`` made (so the cluster keeps its size)."""
        key = self._extra_pods.pop(0)
        del self.objects[key]
        return [], [key]

    def service_added(self) -> Event:
        s = self.scale
        n, g = self.rng.randrange(s.namespaces), self.rng.randrange(s.groups)
        group = GROUPS[g]
        self._serial += 1
        svc = self._service(_ns(n), f"extra-{self._serial}", _ip("10.97.0.1", self._serial),
                            {group: f"{group}-{self.rng.randrange(s.buckets)}"}, self._serial)
        self._extra_services.append(self._put(svc))
        return [svc], []

    def service_changed(self) -> Event:
        """A Service's selector now picks another 25 pods."""
        key = self.rng.choice(self._extra_services)
        old = self.objects[key]
        ((group, value),) = old["spec"]["selector"].items()
        bucket = (int(value.rsplit("-", 1)[1]) + 1) % self.scale.buckets
        svc = {**old, "metadata": {**old["metadata"]},
               "spec": {**old["spec"], "selector": {group: f"{group}-{bucket}"}}}
        self._put(svc)
        return [svc], []

    def service_deleted(self) -> Event:
        key = self._extra_services.pop(0)
        del self.objects[key]
        return [], [key]


def _policy(kind: str, ns: str, name: str, spec: Obj) -> Obj:
    return {"apiVersion": "security.istio.io/v1", "kind": kind, "metadata": {"name": name, "namespace": ns},
            "spec": spec}


# -- 1. one event at a time ---------------------------------------------------------------------------------------
KINDS: dict[str, Callable[[Cluster], Event]] = {
    "pod label (moves Service)": Cluster.pod_relabel,
    "pod readiness flip": Cluster.pod_readiness,
    "pod added": Cluster.pod_added,
    "pod deleted": Cluster.pod_deleted,
    "service added": Cluster.service_added,
    "service selector changed": Cluster.service_changed,
    "service deleted": Cluster.service_deleted,
}
POD_KINDS = tuple(k for k in KINDS if k.startswith("pod"))


class ChangeCounter:
    """The store's subscriber in the benchmark: counts the Changes, so that no event measured is a no-op."""

    def __init__(self) -> None:
        self.changes = 0

    def __call__(self, _state: MeshState, change: Change) -> None:
        if change:
            self.changes += 1


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"p50": at(0.50), "p99": at(0.99), "p99.9": at(0.999), "max": ordered[-1]}


def loaded_store(objects: list[Obj]) -> MeshStore:
    store = MeshStore()
    errors = store.apply(objects)
    if errors:
        raise SystemExit(f"the synthetic cluster is invalid: {errors[0]}")
    return store


@dataclass
class Timings:
    """Microseconds of each call: wall clock, and this thread's CPU time (what is left when other processes
    take the CPU away: on a busy machine the wall clock's tail is theirs)."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    gc_ms: list[float] = field(default_factory=list)  # the garbage collections that fell inside the calls


class GcPauses:
    """Times every garbage collection while in use (the collector stops the loop too: state churn makes
    garbage, and a bigger heap makes each full collection longer)."""

    def __init__(self, into: list[tuple[int, float]]) -> None:
        self.into = into
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.into.append((info["generation"], (time.perf_counter() - self._started) * 1000))

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *_exc: object) -> None:
        gc.callbacks.remove(self)


def time_events(cluster: Cluster, store: MeshStore, rounds: int) -> dict[str, Timings]:
    """Each ``apply`` of each kind of event, the kinds taking turns (a round makes one of each)."""
    counter = ChangeCounter()
    store.subscribe(counter)
    clock, cpu_clock = time.perf_counter_ns, time.thread_time_ns
    times = {kind: Timings() for kind in KINDS}
    collections: list[tuple[int, float]] = []
    with GcPauses(collections):
        for _ in range(rounds):
            for kind, make in KINDS.items():
                upserts, deletes = make(cluster)
                seen = len(collections)
                t0, c0 = clock(), cpu_clock()
                errors = store.apply(upserts, deletes)
                c1, t1 = cpu_clock(), clock()
                times[kind].wall.append((t1 - t0) / 1000)
                times[kind].cpu.append((c1 - c0) / 1000)
                times[kind].gc_ms.extend(ms for _, ms in collections[seen:])
                if errors:
                    raise SystemExit(f"{kind}: {errors[0]}")
    if counter.changes != rounds * len(KINDS):
        raise SystemExit(f"{rounds * len(KINDS) - counter.changes} events changed nothing: the benchmark is wrong")
    return times


def time_rebuilds(objects: list[Obj], count: int) -> Timings:
    """Each whole rebuild (``build_state`` of every object)."""
    out = Timings()
    for _ in range(count):
        t0, c0 = time.perf_counter_ns(), time.thread_time_ns()
        build_state(objects)
        out.cpu.append((time.thread_time_ns() - c0) / 1000)
        out.wall.append((time.perf_counter_ns() - t0) / 1000)
    return out


# -- 2. stalls of the event loop under churn ----------------------------------------------------------------------
@dataclass
class StallRun:
    name: str
    rtts_us: list[float] = field(default_factory=list)
    applies_ms: list[float] = field(default_factory=list)  # wall time of each apply
    applies_cpu_ms: list[float] = field(default_factory=list)  # this thread's CPU time in it
    gc_ms: list[tuple[int, float]] = field(default_factory=list)  # (generation, pause) of every collection
    events: int = 0
    background: Background = field(default_factory=Background)


Applier = Callable[[list[Event]], None]


def delta_applier(store: MeshStore) -> Applier:
    def apply(batch: list[Event]) -> None:
        pending: dict[Key, Obj | None] = {}  # the latest event of each object, as the Kubernetes source keeps them
        for upserts, deletes in batch:
            pending.update({key: None for key in deletes})
            pending.update({(o["kind"], o["metadata"]["namespace"], o["metadata"]["name"]): o for o in upserts})
        errors = store.apply([o for o in pending.values() if o is not None],
                             [k for k, o in pending.items() if o is None])
        if errors:
            raise SystemExit(str(errors[0]))
    return apply


def rebuild_applier(objects: dict[Key, Obj]) -> Applier:
    def apply(batch: list[Event]) -> None:
        for upserts, deletes in batch:
            for key in deletes:
                del objects[key]
            objects.update({(o["kind"], o["metadata"]["namespace"], o["metadata"]["name"]): o for o in upserts})
        build_state(objects.values())
    return apply


async def _echo_server() -> tuple[asyncio.Server, int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(4096):
                writer.write(data)
        finally:
            writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def stall_run(name: str, events: list[Event], apply: Applier | None, rate: float, debounce: float,
                    seconds: float, chunk: int = 0, max_exchanges: int = 5_000_000) -> StallRun:
    """Round trips of a loopback echo while ``events`` are applied at ``rate`` per second: each batch is every
    event due, applied ``debounce`` s after the previous batch at the earliest and never sooner than the last
    apply took (the Kubernetes source's rule); ``chunk``: a batch goes in applies of that many events, the loop
    served between them. ``apply=None``: traffic alone for ``seconds``."""
    run = StallRun(name)
    server, port = await _echo_server()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    done = asyncio.Event()
    message = b"x" * 64

    async def traffic() -> None:
        clock = time.perf_counter_ns
        for _ in range(max_exchanges):
            if done.is_set():
                return
            t0 = clock()
            writer.write(message)
            await reader.readexactly(len(message))
            run.rtts_us.append((clock() - t0) / 1000)

    async def churn() -> None:
        if apply is None:
            await asyncio.sleep(seconds)
            return
        start, sent, total = time.perf_counter(), 0, min(len(events), int(rate * seconds))
        while sent < total:
            due = min(total, int((time.perf_counter() - start) * rate) + 1)
            took = 0.0
            batch_started = time.perf_counter()
            for first in range(sent, due, chunk or max(1, due - sent)):
                if first > sent:
                    await asyncio.sleep(0)  # let traffic through between the parts of a batch
                t0, cpu0 = time.perf_counter(), time.thread_time()
                apply(events[first:min(due, first + (chunk or due))])
                run.applies_ms.append((time.perf_counter() - t0) * 1000)
                run.applies_cpu_ms.append((time.thread_time() - cpu0) * 1000)
            if due > sent:
                took, sent = time.perf_counter() - batch_started, due
            next_due = start + sent / rate
            await asyncio.sleep(max(debounce, took, next_due - time.perf_counter()))
        run.events = sent

    meter = LoadMeter()
    try:
        with GcPauses(run.gc_ms):
            task = asyncio.create_task(traffic())
            await asyncio.wait_for(churn(), timeout=seconds * 20 + 60)
            done.set()
            await asyncio.wait_for(task, timeout=10)
    finally:
        run.background = meter.stop()
        writer.close()
        server.close()
        await server.wait_closed()
    return run


def full_collections(count: int = 3) -> tuple[float, float]:
    """Milliseconds of a full garbage collection (the median of ``count``) with everything now in memory,
    and after ``gc.freeze()`` (what is alive now is then never scanned again)."""
    def median_ms() -> float:
        out = []
        for _ in range(count):
            t0 = time.perf_counter()
            gc.collect()
            out.append((time.perf_counter() - t0) * 1000)
        return statistics.median(out)

    plain = median_ms()
    gc.freeze()
    try:
        frozen = median_ms()
    finally:
        gc.unfreeze()
    return plain, frozen


def stall_runs(cluster: Cluster, rate: float, seconds: float, debounce: float, chunk: int) -> list[StallRun]:
    """Idle traffic, then the same churn applied as deltas (one per apply; batched; batched in chunks) and as
    whole rebuilds."""
    start = dict(cluster.objects)
    kinds = [KINDS[k] for k in POD_KINDS] * 4 + [KINDS[k] for k in KINDS if k not in POD_KINDS]  # mostly pods
    events = [kinds[i % len(kinds)](cluster) for i in range(int(rate * seconds))]
    def deltas() -> Applier:
        return delta_applier(loaded_store(list(start.values())))

    every = f"batched every {debounce * 1000:.0f} ms"
    modes: list[tuple[str, Callable[[], Applier | None], float, int]] = [
        ("traffic alone", lambda: None, 0.0, 0),
        ("deltas, one event per apply", deltas, 0.0, 0),
        (f"deltas, {every}", deltas, debounce, 0),
        (f"deltas, {every}, {chunk} per apply", deltas, debounce, chunk),
        (f"whole rebuilds, {every}", lambda: rebuild_applier(dict(start)), debounce, 0),
    ]
    out = []
    for name, make, pause, part in modes:
        applier = make()
        gc.collect()
        out.append(uvloop.run(stall_run(name, events, applier, rate, pause, seconds, part)))
    return out


# -- report -------------------------------------------------------------------------------------------------------
def _times(ratio: float) -> str:
    return f"{ratio:,.0f}x faster" if ratio >= 10 else f"{ratio:.1f}x" + (" faster" if ratio > 1 else "")


def _verdict(value: float, target: float) -> str:
    return "met" if value < target else "MISSED"


def report(state: MeshState, objects: int, times: dict[str, Timings], rebuilds: Timings,
           stalls: list[StallRun], background: Background, collections: tuple[float, float]) -> None:
    endpoints = sum(len(e) for e in state.endpoints.values())
    print(f"mesh store: {len(state.by_uid):,} workloads (pods) in {len(state.namespaces)} namespaces on "
          f"{len(state.nodes)} nodes, {len(state.services):,} Services, {endpoints:,} endpoints, "
          f"{len(state.objects)} policies; {objects:,} objects")
    rebuild = percentiles(rebuilds.wall)
    print(f"\n1. one event per store.apply(), microseconds (others used {background.other:.0%} of the CPUs, "
          f"steal {background.steal:.0%}); cpu: this thread's CPU time in the call")
    print(f"   {'event':28s} {'n':>6s} {'p50':>9s} {'p99':>9s} {'max':>9s} {'cpu p50':>9s} {'cpu p99':>9s} "
          f"{'gc: n, max ms':>14s}   p99 vs whole rebuild")
    for kind, samples in [*times.items(), ("whole rebuild (build_state)", rebuilds)]:
        p, c = percentiles(samples.wall), percentiles(samples.cpu)
        collected = f"{len(samples.gc_ms)}, {max(samples.gc_ms, default=0):.2f}" if samples is not rebuilds else ""
        print(f"   {kind:28s} {len(samples.wall):6d} {p['p50']:9.0f} {p['p99']:9.0f} {p['max']:9.0f} {c['p50']:9.0f} "
              f"{c['p99']:9.0f} {collected:>14s}   "
              + (_times(rebuild["p50"] / p["p99"]) if samples is not rebuilds else ""))
    for name, kinds, target in (("pod", POD_KINDS, POD_TARGET_US),
                                ("service", [k for k in KINDS if k not in POD_KINDS], SERVICE_TARGET_US)):
        wall = max(percentiles(times[k].wall)["p99"] for k in kinds)
        cpu = max(percentiles(times[k].cpu)["p99"] for k in kinds)
        print(f"   target: p99 < {target / 1000:.0f} ms per {name} event: worst kind {wall:.0f} us, "
              f"{_verdict(wall, target)} (CPU time {cpu:.0f} us, {_verdict(cpu, target)})")

    print("\n2. traffic on the event loop (loopback echo round trips, uvloop) while the store takes churn. The loop is "
          "blocked for each apply's wall time;\n   its CPU time is the store's own share (the rest: other processes "
          "holding the CPU). gc: the longest collection, and how many were full ones.")
    print(f"   {'mode':46s} {'events':>6s} {'applies':>7s} {'apply max ms':>12s} {'(cpu)':>6s} {'gc ms':>7s} "
          f"{'full':>4s} {'exchanges':>9s} {'rtt p50 us':>10s} {'p99':>5s} {'p99.9':>6s} {'max':>8s} {'>2ms':>5s}  "
          f"others")
    for run in stalls:
        p = percentiles(run.rtts_us)
        slow = sum(1 for r in run.rtts_us if r > STALL_TARGET_MS * 1000)
        full = sum(1 for generation, _ in run.gc_ms if generation == 2)
        print(f"   {run.name:46s} {run.events:6d} {len(run.applies_ms):7d} {max(run.applies_ms, default=0):12.2f} "
              f"{max(run.applies_cpu_ms, default=0):6.2f} {max((ms for _, ms in run.gc_ms), default=0):7.2f} "
              f"{full:4d} {len(run.rtts_us):9d} {p['p50']:10.0f} {p['p99']:5.0f} {p['p99.9']:6.0f} {p['max']:8.0f} "
              f"{slow:5d}  {run.background.other:.0%}")
    alone = percentiles(stalls[0].rtts_us)["max"] / 1000
    for run in stalls[1:-1]:
        cpu, wall = max(run.applies_cpu_ms, default=0), max(run.applies_ms, default=0)
        print(f"   target: longest stall < {STALL_TARGET_MS:.0f} ms ({run.name}): the store blocked the loop for at "
              f"most {cpu:.2f} ms of CPU ({wall:.2f} ms wall), {_verdict(cpu, STALL_TARGET_MS)}; "
              f"slowest round trip {percentiles(run.rtts_us)['max'] / 1000:.2f} ms ({alone:.2f} ms with no churn)")
    plain, frozen = collections
    print(f"\n   garbage collector: a full collection with all this in memory takes {plain:.0f} ms "
          f"({frozen:.1f} ms after gc.freeze())")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.store", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--namespaces", type=int, default=100)
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--pods", type=int, default=10_000)
    parser.add_argument("--services", type=int, default=2_000)
    parser.add_argument("--per-service", type=int, default=25, help="pods each Service selects")
    parser.add_argument("--rounds", type=int, default=1000, help="events of each kind timed")
    parser.add_argument("--rebuilds", type=int, default=5, help="whole rebuilds timed")
    parser.add_argument("--rate", type=float, default=200.0, help="events/s of the churn")
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each churn run")
    parser.add_argument("--debounce", type=float, default=0.05, help="the Kubernetes source's batching (s)")
    parser.add_argument("--chunk", type=int, default=4, help="events per apply in the chunked batches")
    parser.add_argument("--quiet-wait", type=float, default=60.0, help="wait at most this for a quiet machine")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    scale = Scale(args.namespaces, args.nodes, args.pods, args.services, args.per_service)
    if (problem := scale.check()) is not None:
        parser.error(problem)
    if args.chunk < 1:
        parser.error("--chunk must be at least 1")
    logging.basicConfig(level=logging.ERROR)

    cluster = Cluster(scale, args.seed)
    objects = list(cluster.objects.values())
    store = loaded_store(objects)
    state = store.state  # the cluster as loaded: what the figures are measured at
    if args.quiet_wait > 0:
        wait_until_quiet(args.quiet_wait)
    gc.collect()
    meter = LoadMeter()
    rebuilds = time_rebuilds(objects, args.rebuilds)
    gc.collect()
    gc.freeze()  # as the agent does once started (agent/__main__.py): the loaded cluster is not scanned again
    times = time_events(cluster, store, args.rounds)
    background = meter.stop()
    collections = full_collections()
    stalls = stall_runs(cluster, args.rate, args.seconds, args.debounce, args.chunk)
    report(state, len(cluster.objects), times, rebuilds, stalls, background, collections)


if __name__ == "__main__":
    main()
