"""What an agent tells about itself: flows (Observer API), Prometheus metrics, readiness, config dump.

The proxies record a flow when a connection's route is ready and end it with the bytes moved each way;
a denial is a DROPPED flow naming the policy and rule. The eBPF programs' events (SYN/FIN/RST seen,
packets dropped while failing closed) come from the ring buffer, read on the event loop in batches
(``kernel_reader``) and made flows only when read; events the kernel could not queue are counted and shown
to readers as lost, never dropped silently.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from agent.identity.manager import CertificateStatus
from agent.mesh.memo import StateMemo
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
from agent.telemetry.kernel import KernelRecords
from agent.telemetry.kernel_reader import KernelReader
from agent.telemetry.metrics import DENY, Metrics
from agent.telemetry.observer import ObserverServer
from agent.telemetry.observer_tls import ServerTls, ServerTlsFiles, operator_identity
from agent.telemetry.recorder import Endpoint, FlowHandle, FlowRecorder

log = logging.getLogger(__name__)


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
        # What the store knows of an IP, as an Endpoint without port and service: a connection's two ends cost a
        # dict lookup, not a Workload's identity string and labels read again (a change also makes the recorder
        # forget kernel events' addresses).
        self._known: StateMemo[str | tuple[str, str], Endpoint] = StateMemo(store)  # by IP, or (IP, Service called)
        self._kernel: KernelReader | None = None
        store.subscribe(self._mesh_changed)

    def endpoint(self, address: Address, service: str | None = None) -> Endpoint:
        """What the store knows of ``address``: the pod, its namespace, labels and identity; ``service`` is the
        hostname of the Service the client called, when known."""
        return self._known_end(self._known.current(), address[0]).at(address[1], service or "")

    def _known_end(self, known: dict[str | tuple[str, str], Endpoint], ip: str, service: str = "") -> Endpoint:
        """``ip`` as the store knows it (port 0), reached through ``service`` if one is named: kept per mesh state."""
        e = known.get((ip, service) if service else ip)
        if e is None:
            if service:
                e = known[(ip, service)] = self._known_end(known, ip).at(0, service)
            else:
                w = self.store.state.by_ip(ip)
                e = known[ip] = (Endpoint(ip, 0) if w is None else
                                 Endpoint(ip, 0, str(w.identity(self.trust_domain)), w.namespace, w.name, w.labels,
                                          w.labels.get("app", w.name)))
        return e

    def opened(self, *, inbound: bool, client: Address, target: Address, mtls: bool,
               service: str | None = None) -> FlowHandle | None:
        if not self.config.enabled:
            return None
        known = self._known.current()
        return self.recorder.start(direction="INGRESS" if inbound else "EGRESS",
                                   reporter="destination" if inbound else "source",
                                   source=self._known_end(known, client[0]),
                                   destination=self._known_end(known, target[0], service or ""), mtls=mtls,
                                   ports=(client[1], target[1]))

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

    def _mesh_changed(self, _state: MeshState, change: Change) -> None:
        self.recorder.forget_addresses()
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

    def watch_kernel(self, source: KernelRecords) -> None:
        """Read the eBPF ring buffer on the running event loop: each event becomes a flow; losses are counted."""
        if self.config.enabled:
            self._kernel = KernelReader(source, self.recorder)

    async def stop_serving_admin(self) -> None:
        """Leave the admin, metrics and readiness ports to the next agent (an upgrade's handover)."""
        if self._admin is not None:
            await self._admin.close()
            self._admin = None

    async def close(self) -> None:
        if self._kernel is not None:
            self._kernel.close()
            self._kernel = None
        await self.observer.stop()
        if self._admin is not None:
            await self._admin.close()
