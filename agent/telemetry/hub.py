"""What an agent tells about itself: flows (Observer API), Prometheus metrics, readiness, config dump.

The proxies record a flow when a connection's route is ready and end it with the bytes moved each way;
a denial is a DROPPED flow naming the policy and rule. The eBPF programs' events (SYN/FIN/RST seen,
packets dropped while failing closed) come from the ring buffer, read on a thread of its own; events
the kernel could not queue are counted and shown to readers as lost, never dropped silently.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass

from agent.identity.manager import CertificateStatus
from agent.mesh.model import Address
from agent.mesh.store import Change, MeshState, MeshStore
from agent.telemetry.admin import (
    ADMIN_ADDRESS,
    METRICS_ADDRESS,
    READY_ADDRESS,
    AdminServer,
    ConfigDump,
    ReadyCheck,
)
from agent.telemetry.kernel import KernelEvent, KernelEventSource
from agent.telemetry.metrics import DENY, Metrics
from agent.telemetry.observer import ObserverServer
from agent.telemetry.observer_tls import ServerTls, ServerTlsFiles, operator_identity
from agent.telemetry.recorder import Endpoint, FlowHandle, FlowRecorder

log = logging.getLogger(__name__)

# After a wake-up that brought kernel events, the reader lets the next ones gather this long before it reads
# again: a connection brings several events, and taking the interpreter (the GIL) from the event loop once per
# event cost the loop more than the events themselves. The ring buffer holds 4096 events, 40,000/s at this
# pace; events it could not take are counted (hubble_lost_events_total), never silently dropped.
KERNEL_BATCH = 0.1
# A batch is read in slices: after each slice the reader sleeps a moment, so that the event loop, which may be
# waiting for the interpreter, gets it at once (else it would wait up to the 5 ms switch interval).
KERNEL_YIELD_EVERY = 32
KERNEL_YIELD = 0.0002
ENDPOINT_CACHE = 4096  # addresses whose Endpoint is kept (per state); past it the cache starts over


@dataclass(frozen=True)
class TelemetryConfig:
    enabled: bool = True  # off: no flows, no traffic metrics, no kernel events (to measure what they cost)
    flows: int = 4096  # flows kept in the ring
    observer_socket: str | None = None
    observer_listen: str | None = None  # TCP "host:port", served only with observer_tls (mutual TLS)
    observer_tls: ServerTlsFiles | None = None
    metrics_listen: Address = METRICS_ADDRESS
    ready_listen: Address = READY_ADDRESS
    admin_listen: Address | None = ADMIN_ADDRESS  # None: the admin endpoints on admin_socket only
    admin_socket: str | None = None  # the admin endpoints on a unix socket too (``ambit status`` in the lab)


class Telemetry:
    def __init__(self, node: str, store: MeshStore, trust_domain: str, config: TelemetryConfig) -> None:
        self.store, self.trust_domain, self.config = store, trust_domain, config
        self.metrics = Metrics()
        self.recorder = FlowRecorder(node, config.flows, self.metrics, resolve=lambda ip: self.endpoint((ip, 0)))
        self.observer = ObserverServer(self.recorder)
        self._admin: AdminServer | None = None
        # What the store knows of an IP, as an Endpoint without port and service, for the state it was read from:
        # a connection's two ends (and each kernel event's) cost a dict lookup, not a Workload's identity string
        # and labels read again. A new state (any change) starts a new cache.
        self._known: tuple[MeshState | None, dict[str, Endpoint]] = (None, {})
        self._stop = threading.Event()
        self._events: threading.Thread | None = None
        store.subscribe(self._forget_deleted)

    def endpoint(self, address: Address, service: str | None = None) -> Endpoint:
        """What the store knows of ``address``: the pod, its namespace, labels and identity; ``service`` is the
        hostname of the Service the client called, when known."""
        ip = address[0]
        state = self.store.state
        cached_for, known = self._known
        if cached_for is not state or len(known) >= ENDPOINT_CACHE:
            known = {}
            self._known = (state, known)  # one assignment: the kernel event reader may be reading it
        e = known.get(ip)
        if e is None:
            w = state.by_ip(ip)
            e = known[ip] = (Endpoint(ip, 0) if w is None else
                             Endpoint(ip, 0, str(w.identity(self.trust_domain)), w.namespace, w.name, w.labels,
                                      w.labels.get("app", w.name)))
        return Endpoint(ip, address[1], e.identity, e.namespace, e.pod_name, e.labels, e.workload, service or "")

    def opened(self, *, inbound: bool, client: Address, target: Address, mtls: bool,
               service: str | None = None) -> FlowHandle | None:
        if not self.config.enabled:
            return None
        return self.recorder.start(direction="INGRESS" if inbound else "EGRESS",
                                   reporter="destination" if inbound else "source", source=self.endpoint(client),
                                   destination=self.endpoint(target, service), mtls=mtls)

    def dropped(self, *, inbound: bool, client: Address, target: Address, mtls: bool, reason: str,
               policy: str | None = None, service: str | None = None, response_flags: str = DENY) -> None:
        if not self.config.enabled:
            return
        self.recorder.drop(direction="INGRESS" if inbound else "EGRESS",
                           reporter="destination" if inbound else "source",
                           source=self.endpoint(client), destination=self.endpoint(target, service), mtls=mtls,
                           reason=reason, policy=policy, response_flags=response_flags)

    def update_gauges(self, attachments: list[tuple[str, str]], certificates: list[CertificateStatus]) -> None:
        workloads = self.store.state.by_uid.values()
        enrolled = sum(1 for w in workloads if w.enrolled)
        self.metrics.set_workloads(enrolled, len(workloads) - enrolled)
        self.metrics.set_ebpf_attachments(attachments)
        for status in certificates:
            if status.not_after is not None:
                self.metrics.set_certificate_expiry(str(status.identity), status.not_after.timestamp())

    def _forget_deleted(self, _state: MeshState, change: Change) -> None:
        for w in change.removed.values():
            self.metrics.forget_workload(w.namespace, w.name)

    async def start(self, ready: ReadyCheck, config_dump: ConfigDump) -> None:
        cfg = self.config
        tls = (ServerTls(cfg.observer_tls, [operator_identity(self.trust_domain)]) if cfg.observer_tls is not None
               else None)
        await self.observer.start(unix_path=cfg.observer_socket, tcp=cfg.observer_listen, tls=tls)
        self._admin = AdminServer(self.metrics, ready=ready, config_dump=config_dump)
        await self._admin.start(metrics=cfg.metrics_listen, ready=cfg.ready_listen, admin=cfg.admin_listen,
                                admin_socket=cfg.admin_socket)

    def watch_kernel(self, redirector: KernelEventSource) -> None:
        """Read the eBPF ring buffer on a thread: each event becomes a flow; losses are counted."""
        if not self.config.enabled:
            return
        delivered = 0

        def deliver(ev: KernelEvent) -> None:
            nonlocal delivered
            self.recorder.kernel_event(ev)
            delivered += 1
            if delivered % KERNEL_YIELD_EVERY == 0:
                time.sleep(KERNEL_YIELD)  # the event loop takes the interpreter meanwhile: a batch never stalls it long

        redirector.subscribe(deliver)

        def pump() -> None:
            lost, checked = redirector.lost_events, time.monotonic()
            while not self._stop.is_set():
                if redirector.poll_events(200):  # delivers to the recorder
                    self._stop.wait(KERNEL_BATCH)
                # a full ring is when nothing arrives: check every 200 ms, not on every wake-up
                if time.monotonic() - checked >= 0.2:
                    now, checked = redirector.lost_events, time.monotonic()
                    if now > lost:
                        self.recorder.lost_kernel_events(now - lost)
                        lost = now

        self._events = threading.Thread(target=pump, name="ebpf-events", daemon=True)
        self._events.start()

    async def stop_serving_admin(self) -> None:
        """Leave the admin, metrics and readiness ports to the next agent (an upgrade's handover)."""
        if self._admin is not None:
            await self._admin.close()
            self._admin = None

    async def close(self) -> None:
        self._stop.set()
        if self._events is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._events.join, 2.0)
        await self.observer.stop()
        if self._admin is not None:
            await self._admin.close()
