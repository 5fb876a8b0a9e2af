"""The agent's Prometheus metrics, named and labelled as the dashboards people already have expect them.

- ztunnel's L4 families (Kiali and Istio's Grafana dashboards read them): ``istio_tcp_connections_opened_total``,
  ``istio_tcp_connections_closed_total``, ``istio_tcp_sent_bytes_total``, ``istio_tcp_received_bytes_total``,
  ``istio_tcp_connections_failed_total``, with ztunnel's label set (``TRAFFIC_LABELS``). As in Istio,
  "sent" bytes are the response direction (destination -> source) and "received" bytes the request
  direction (source -> destination), whichever side reports.
- Hubble's: ``hubble_flows_processed_total{type,subtype,verdict}``, ``hubble_drop_total{reason,protocol}``,
  ``hubble_tcp_flags_total{flag,family}``, ``hubble_lost_events_total{source}``.
- The agent's health: ``ambit_workloads{enrolled}``, ``ambit_certificate_expiry_seconds{identity}`` (time left,
  computed at scrape time), ``ambit_ebpf_attached{program,backend}`` (interfaces carrying each program),
  ``ambit_kernel_events_rejected_total`` (eBPF events left out because they were malformed).

Workload labels are derived from pod labels the way Istio does (``canonical_service``,
``canonical_revision``); missing values are "unknown". Deleted pods are forgotten (``forget_workload``):
every series that a pod contributed to, and that no live pod still feeds, is removed, so cardinality does
not grow with pod churn.

Counters are kept in plain dicts behind one lock and written out by ``agent.telemetry.exposition`` (text format
0.0.4 or OpenMetrics): increments are a dict update, series can be removed, and no ``_created`` series double the
exposition.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from agent.telemetry.exposition import Family
from agent.telemetry.model import Endpoint

UNKNOWN = "unknown"

# ztunnel's label set, in ztunnel's order.
TRAFFIC_LABELS: tuple[str, ...] = (
    "reporter",
    "source_workload", "source_canonical_service", "source_canonical_revision", "source_workload_namespace",
    "source_principal", "source_app", "source_version", "source_cluster",
    "destination_service", "destination_service_namespace", "destination_service_name",
    "destination_workload", "destination_canonical_service", "destination_canonical_revision",
    "destination_workload_namespace", "destination_principal", "destination_app", "destination_version",
    "destination_cluster",
    "request_protocol", "response_flags", "connection_security_policy",
)
_FLAGS_AT = TRAFFIC_LABELS.index("response_flags")

# Istio's response flags at L4.
NO_FLAGS = "-"
NO_HEALTHY_UPSTREAM = "UH"  # Envoy's flag (Kiali knows it): nothing could serve the Service port
DENY = "DENY"
CONNECT = "CONNECT"
TLS_FAILURE = "TLS_FAILURE"

CANONICAL_NAME = ("service.istio.io/canonical-name", "app.kubernetes.io/name", "app")
CANONICAL_REVISION = ("service.istio.io/canonical-revision", "app.kubernetes.io/version", "version")


def canonical_service(labels: Mapping[str, str], workload: str) -> str:
    """Istio's canonical service: the canonical-name label, else app.kubernetes.io/name, else app, else
    the workload name."""
    for key in CANONICAL_NAME:
        if labels.get(key):
            return labels[key]
    return workload or UNKNOWN


def canonical_revision(labels: Mapping[str, str]) -> str:
    """Istio's canonical revision: canonical-revision, app.kubernetes.io/version, version, else "latest"."""
    for key in CANONICAL_REVISION:
        if labels.get(key):
            return labels[key]
    return "latest"


def _workload_labels(ep: Endpoint, cluster: str) -> tuple[str, str, str, str, str, str, str, str]:
    """workload, canonical service, canonical revision, namespace, principal, app, version, cluster."""
    if not ep.pod_name and not ep.workload:
        return (UNKNOWN, UNKNOWN, UNKNOWN, ep.namespace or UNKNOWN, ep.identity or UNKNOWN, UNKNOWN, UNKNOWN,
                UNKNOWN)
    workload = ep.workload or ep.pod_name
    service = canonical_service(ep.labels, workload)
    revision = canonical_revision(ep.labels)
    return (workload, service, revision, ep.namespace or UNKNOWN, ep.identity or UNKNOWN, service, revision,
            cluster)


def _service_labels(ep: Endpoint) -> tuple[str, str, str]:
    """destination_service (hostname), its namespace, its name."""
    if not ep.service:
        return UNKNOWN, UNKNOWN, UNKNOWN
    name, _, rest = ep.service.partition(".")
    namespace = rest.partition(".")[0] if rest else (ep.namespace or UNKNOWN)
    return ep.service, namespace or UNKNOWN, name


def traffic_labels(reporter: str, source: Endpoint, destination: Endpoint, mtls: bool, *,
                   response_flags: str = NO_FLAGS, cluster: str = "Kubernetes") -> tuple[str, ...]:
    """The values of ``TRAFFIC_LABELS`` for one connection."""
    src = _workload_labels(source, cluster)
    dst = _workload_labels(destination, cluster)
    svc = _service_labels(destination)
    return (reporter, *src, *svc, *dst, "tcp", response_flags, "mutual_tls" if mtls else UNKNOWN)


TRAFFIC_MEMORY = 4096  # connections' label values kept (Metrics._traffic_of); past it the memory starts over
Feeds = tuple[tuple[int, str], ...]  # (side: 0 source / 1 destination, "namespace/pod") of a series' pods
SeriesSide = tuple[int, tuple[str, ...], int]  # (family slot, label values, side)


def _feeds(source: Endpoint, destination: Endpoint) -> Feeds:
    """The pods whose workload labels a connection's series carry, by side."""
    return tuple((side, ep.pod_key) for side, ep in enumerate((source, destination)) if ep.pod_name)


class _Family:
    """One counter family's series: label values -> value."""

    __slots__ = ("doc", "labelnames", "name", "slot", "values")

    def __init__(self, name: str, doc: str, labelnames: tuple[str, ...], slot: int = -1) -> None:
        self.name = name
        self.slot = slot  # index among the traffic families, whose series are tracked per pod; else -1
        self.doc = doc
        self.labelnames = labelnames
        self.values: dict[tuple[str, ...], float] = {}

    def family(self) -> Family:
        return Family(self.name, self.doc, "counter", self.labelnames, list(self.values.items()))


class Traffic:
    """A connection shape's label values and feeds (remembered by ``Metrics._traffic_of``), and the traffic
    families whose series already count these feeds: a bit per slot in ``fed``, true while the metrics' epoch is
    ``epoch`` (only a forgotten pod, which starts a new epoch, takes feeds away)."""

    __slots__ = ("epoch", "fed", "feeds", "labels", "mappings")

    def __init__(self, labels: tuple[str, ...], feeds: Feeds, mappings: tuple[object, object]) -> None:
        self.labels, self.feeds = labels, feeds
        self.mappings = mappings  # the ends' labels mappings, held so that their ids stay theirs
        self.epoch, self.fed = -1, 0


@dataclass(slots=True)
class ConnectionSeries:
    """An open connection's series: close it once, with the bytes each way."""

    metrics: Metrics
    traffic: Traffic
    epoch: int
    closed: bool = False

    def close(self, request_bytes: int, response_bytes: int, response_flags: str = NO_FLAGS,
              failed: bool = False) -> None:
        """request_bytes: source -> destination; response_bytes: destination -> source."""
        if self.closed:
            return
        self.closed = True
        self.metrics.count({}, {(self.traffic, self.epoch, response_flags, failed): [1, request_bytes, response_bytes]})


ClosedKey = tuple[Traffic, int, str, bool]  # (series, epoch when opened, response flags, failed)


class Metrics:
    """All of the agent's metrics (``families()``). Thread-safe."""

    def __init__(self, *, cluster: str = "Kubernetes", clock: Callable[[], float] = time.time,
                 forgotten_memory: int = 4096) -> None:
        self.cluster = cluster
        self._clock = clock
        self._lock = threading.Lock()
        self.opened = _Family("istio_tcp_connections_opened", "The total number of TCP connections opened",
                              TRAFFIC_LABELS, 0)
        self.closed = _Family("istio_tcp_connections_closed", "The total number of TCP connections closed",
                              TRAFFIC_LABELS, 1)
        self.failed = _Family("istio_tcp_connections_failed", "The total number of TCP connections that failed",
                              TRAFFIC_LABELS, 2)
        self.sent = _Family("istio_tcp_sent_bytes",
                            "The size of total bytes sent during response in case of a TCP connection",
                            TRAFFIC_LABELS, 3)
        self.received = _Family("istio_tcp_received_bytes",
                                "The size of total bytes received during request in case of a TCP connection",
                                TRAFFIC_LABELS, 4)
        self.flows = _Family("hubble_flows_processed", "Total number of flows processed",
                             ("type", "subtype", "verdict"))
        self.drops = _Family("hubble_drop", "Number of drops", ("reason", "protocol"))
        self.tcp = _Family("hubble_tcp_flags", "TCP flag occurrences", ("flag", "family"))
        self.lost = _Family("hubble_lost_events", "Number of lost events", ("source",))
        self.rejected = _Family("ambit_kernel_events_rejected", "eBPF events left out because they were malformed",
                                ())
        self._traffic = (self.opened, self.closed, self.failed, self.sent, self.received)
        assert all(f.slot == i for i, f in enumerate(self._traffic))
        self._families = (*self._traffic, self.flows, self.drops, self.tcp, self.lost, self.rejected)
        # For forget_workload: a series' side (its source_* or destination_* labels) -> the live pods it was
        # recorded for; a pod -> the series sides it feeds. A series goes when one of its sides has no pod left.
        self._feeders: dict[SeriesSide, set[str]] = {}
        self._fed_by: dict[str, set[SeriesSide]] = {}
        self._epoch = 0
        self._forgotten: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._forgotten_memory = forgotten_memory
        self._workloads: dict[str, int] = {}
        self._cert_expiry: dict[str, float] = {}
        self._attached: dict[tuple[str, str], int] = {}
        self._traffic_memory: dict[tuple[object, ...], Traffic] = {}
        self._held: Callable[[], None] | None = None  # counts a recorder holds back (``counts_held_by``)

    def counts_held_by(self, catch_up: Callable[[], None]) -> None:
        """A recorder holds counts back (a batch at a time): ``catch_up`` counts them, before anyone reads the
        series or a pod's series are forgotten."""
        self._held = catch_up

    def _catch_up(self) -> None:
        if self._held is not None:
            self._held()

    # -- Istio traffic ------------------------------------------------------------------------------------------
    def _inc(self, family: _Family, labels: tuple[str, ...], feeds: Feeds, amount: float = 1,
             traffic: Traffic | None = None) -> None:
        """Under the lock. ``traffic``: where ``labels`` and ``feeds`` come from, if remembered."""
        values = family.values
        values[labels] = values.get(labels, 0) + amount
        if feeds and family.slot >= 0:
            if traffic is not None:
                bit = 1 << family.slot
                if traffic.epoch != self._epoch:
                    traffic.epoch, traffic.fed = self._epoch, 0
                elif traffic.fed & bit:
                    return
                traffic.fed |= bit
            for side, pod in feeds:
                key = (family.slot, labels, side)
                feeders = self._feeders.get(key)
                if feeders is None:
                    feeders = self._feeders[key] = set()
                if pod not in feeders:
                    feeders.add(pod)
                    self._fed_by.setdefault(pod, set()).add(key)

    def _traffic_of(self, reporter: str, source: Endpoint, destination: Endpoint, mtls: bool) -> Traffic:
        """A connection's label values and feeds, remembered by what they are made of: its ends' labels
        mappings by identity (the store replaces a pod's labels, never changes them; the memory holds them, so
        an id is not reused while it is a key)."""
        key = (reporter, mtls, source.identity, source.namespace, source.pod_name, source.workload, id(source.labels),
               destination.identity, destination.namespace, destination.pod_name, destination.workload,
               id(destination.labels), destination.service)
        known = self._traffic_memory.get(key)
        if known is None:
            if len(self._traffic_memory) >= TRAFFIC_MEMORY:
                self._traffic_memory = {}
            known = self._traffic_memory[key] = Traffic(
                traffic_labels(reporter, source, destination, mtls, cluster=self.cluster),
                _feeds(source, destination), (source.labels, destination.labels))
        return known

    def connection_opened(self, reporter: str, source: Endpoint, destination: Endpoint,
                          mtls: bool) -> ConnectionSeries:
        """Count an accepted connection; close the returned series when it ends."""
        series = self.series_of(reporter, source, destination, mtls)
        self.count({series.traffic: 1}, {})
        return series

    def series_of(self, reporter: str, source: Endpoint, destination: Endpoint, mtls: bool) -> ConnectionSeries:
        """A connection's series, not counted: for a batch's ``count``."""
        return ConnectionSeries(self, self._traffic_of(reporter, source, destination, mtls), self._epoch)

    def count(self, opened: dict[Traffic, int], closed: dict[ClosedKey, list[int]]) -> None:
        """A batch of connections, by series: ``opened`` how many opened; ``closed`` [how many, request bytes,
        response bytes] per (series, epoch opened in, response flags, failed). One lock and one count per series,
        however many connections the batch has."""
        with self._lock:
            for traffic, n in opened.items():
                self._inc(self.opened, traffic.labels, traffic.feeds, n, traffic)
            for (traffic, epoch, response_flags, failed), (n, request_bytes, response_bytes) in closed.items():
                labels, feeds = traffic.labels, traffic.feeds
                if self._epoch != epoch and any(self._forgotten.get(p, -1) >= epoch for _s, p in feeds):
                    continue  # a pod of these connections was deleted meanwhile: its series are gone, keep them gone
                if response_bytes:
                    self._inc(self.sent, labels, feeds, response_bytes, traffic)
                if request_bytes:
                    self._inc(self.received, labels, feeds, request_bytes, traffic)
                remembered = traffic if response_flags == labels[_FLAGS_AT] else None  # (other flags: other series)
                if remembered is None:
                    labels = (*labels[:_FLAGS_AT], response_flags, *labels[_FLAGS_AT + 1:])
                self._inc(self.closed, labels, feeds, n, remembered)
                if failed:
                    self._inc(self.failed, labels, feeds, n, remembered)

    def connection_denied(self, reporter: str, source: Endpoint, destination: Endpoint, mtls: bool,
                          response_flags: str = DENY) -> None:
        """A connection refused by the mesh: opened, closed and failed, with its response flags (as ztunnel
        records a policy denial)."""
        labels = traffic_labels(reporter, source, destination, mtls, response_flags=response_flags,
                                cluster=self.cluster)
        feeds = _feeds(source, destination)
        with self._lock:
            for family in (self.opened, self.closed, self.failed):
                self._inc(family, labels, feeds)

    def forget_workload(self, namespace: str, name: str) -> int:
        """A pod was deleted: remove every series that carries its workload's labels on a side that no other
        live pod feeds (with the pod name as workload: every series naming it). Returns how many went."""
        self._catch_up()
        pod = f"{namespace}/{name}"
        removed = 0
        with self._lock:
            self._epoch += 1
            self._forgotten[pod] = self._epoch
            self._forgotten.move_to_end(pod)
            while len(self._forgotten) > self._forgotten_memory:
                self._forgotten.popitem(last=False)
            for key in self._fed_by.pop(pod, ()):
                feeders = self._feeders.get(key)
                if feeders is None:
                    continue
                feeders.discard(pod)
                if feeders:
                    continue
                slot, labels, _side = key
                for side in (0, 1):  # the series goes: forget both of its sides
                    for other in self._feeders.pop((slot, labels, side), ()):
                        fed = self._fed_by.get(other)
                        if fed is not None:
                            fed.discard((slot, labels, side))
                            if not fed:
                                del self._fed_by[other]
                if self._traffic[slot].values.pop(labels, None) is not None:
                    removed += 1
        return removed

    # -- Hubble --------------------------------------------------------------------------------------------------
    def flow_processed(self, type_: str, subtype: str, verdict: str, count: int = 1) -> None:
        with self._lock:
            self._inc(self.flows, (type_, subtype, verdict), (), count)

    def dropped(self, reason: str, protocol: str = "TCP", count: int = 1) -> None:
        with self._lock:
            self._inc(self.drops, (reason, protocol), (), count)

    def tcp_flags(self, flags: Iterable[str], family: str, count: int = 1) -> None:
        """``count`` packets, each with these ``flags``."""
        with self._lock:
            for flag in flags:
                self._inc(self.tcp, (flag, family), (), count)

    def lost_events(self, source: str, count: int) -> None:
        if count > 0:
            with self._lock:
                self._inc(self.lost, (source,), (), count)

    def kernel_event_rejected(self) -> None:
        with self._lock:
            self._inc(self.rejected, (), ())

    # -- agent health -----------------------------------------------------------------------------------------
    def set_workloads(self, enrolled: int, not_enrolled: int) -> None:
        """Pods on this node in the mesh, and not."""
        with self._lock:
            self._workloads = {"true": enrolled, "false": not_enrolled}

    def set_certificate_expiry(self, identity: str, not_after: float) -> None:
        """A workload certificate's expiry (seconds since the epoch); exposed as seconds left."""
        with self._lock:
            self._cert_expiry[identity] = not_after

    def forget_certificate(self, identity: str) -> None:
        with self._lock:
            self._cert_expiry.pop(identity, None)

    def set_ebpf_attachments(self, attachments: Iterable[tuple[str, str]]) -> None:
        """Replace the attachment counts with these (program, backend) pairs, one per interface."""
        counts: dict[tuple[str, str], int] = {}
        for key in attachments:
            counts[key] = counts.get(key, 0) + 1
        with self._lock:
            self._attached = counts

    # -- exposition ----------------------------------------------------------------------------------------------
    def families(self) -> list[Family]:
        """Every family as it is now, for the exposition."""
        self._catch_up()
        with self._lock:
            families = [f.family() for f in self._families]
            workloads = dict(self._workloads)
            expiry = dict(self._cert_expiry)
            attached = dict(self._attached)
        now = self._clock()
        return [*families,
                Family("ambit_workloads", "Pods on this node, by mesh enrollment", "gauge", ("enrolled",),
                       [((enrolled,), count) for enrolled, count in sorted(workloads.items())]),
                Family("ambit_certificate_expiry_seconds",
                       "Seconds until the workload certificate of an identity expires", "gauge", ("identity",),
                       [((identity,), not_after - now) for identity, not_after in sorted(expiry.items())]),
                Family("ambit_ebpf_attached", "Interfaces carrying each Ambit eBPF program", "gauge",
                       ("program", "backend"), [(key, count) for key, count in sorted(attached.items())])]

    def series(self, family: str) -> dict[tuple[str, ...], float]:
        """A copy of one counter family's series (name without _total), for checks."""
        self._catch_up()
        with self._lock:
            for f in self._families:
                if f.name == family:
                    return dict(f.values)
        raise KeyError(family)
