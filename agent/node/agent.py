"""The node agent: capture (eBPF), identities (CA), proxies (HBONE), kept in step with the cluster state.

Start-up order matters for fail-closed: the listeners exist before the programs look for them, and
the cluster state is loaded before the first reconcile, so no enrolled pod is ever captured by a
program with no proxy behind it (its SYNs are dropped, not forwarded in the clear).

Kernel work (netlink, BPF maps, attachments) runs on one worker thread: its calls block, and one thread also keeps
those operations in order.
State changes only wake the reconcile loop, which works from the latest state: a burst of label
changes costs one reconcile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from agent import __version__
from agent.capture import Listener, Redirector, host_ifname_for
from agent.capture.ctnetlink import Conntrack
from agent.capture.rtnl import Rtnl
from agent.identity.ca_client import CaClient
from agent.identity.manager import CertificateManager
from agent.mesh import views
from agent.mesh.ports import Ports
from agent.mesh.store import Change, MeshState, MeshStore, Workload
from agent.node import heap
from agent.node.capture_plan import capture_plan
from agent.node.kernel_events import KernelEvents
from agent.proxy.authorize import Authorizer
from agent.proxy.context import Mesh
from agent.proxy.inbound import InboundProxy
from agent.proxy.outbound import OutboundProxy
from agent.proxy.sockets import dial, transparent_listener
from agent.telemetry.hub import Telemetry, TelemetryConfig
from hbone import Pool, SpiffeId, TrustBundle, canonical_ip

if TYPE_CHECKING:
    from agent.kube.source import KubeSource

log = logging.getLogger(__name__)
T = TypeVar("T")
CONNTRACK_TIMEOUT = 0.2  # seconds for one lookup, on the event loop (it answers in ~30 us)


@dataclass(frozen=True)
class AgentConfig:
    node: str
    state: Path | None  # the lab's cluster-state file; None: watch the Kubernetes API instead
    ca_address: str
    ca_token: Path
    trust_bundle: Path
    trust_domain: str = "cluster.local"
    uplinks: tuple[str, ...] = ("eth0",)
    fail_open: bool = False
    node_passes: bool = False  # every connection the node opens to a pod passes (Istio); else its probe ports only
    proc_sys: str = "/proc/sys"  # the node's /proc/sys (a container mounts the host's /proc/sys/net elsewhere)
    ports: Ports = Ports()
    kubeconfig: Path | None = None  # with state None: a kubeconfig, or None for in-cluster config
    kube_context: str | None = None  # the kubeconfig's context (None: its current-context)
    sync_timeout: float = 60.0
    telemetry: TelemetryConfig = TelemetryConfig()
    bpffs: str = "/sys/fs/bpf"  # tcx links are pinned under <bpffs>/ambit/<node>
    daemonset: tuple[str, str] | None = None  # (namespace, name) of the agent's DaemonSet: gone = uninstall


def migrate_queued_connections() -> None:
    """net.ipv4.tcp_migrate_req=1: connections queued on a closing listener move to another of its
    SO_REUSEPORT group (the next agent's) instead of being reset. Best effort (a read-only /proc/sys)."""
    try:
        Path("/proc/sys/net/ipv4/tcp_migrate_req").write_text("1\n")
    except OSError as e:
        log.info("net.ipv4.tcp_migrate_req not set (%s): an upgrade may reset connections queued at the hand-over",
                 e.strerror)


def node_addresses() -> frozenset[str]:
    """The node's own addresses, both families (the proxies never spoof a pod's address towards them)."""
    with Rtnl() as rtnl:
        found = {canonical_ip(a.address) for a in rtnl.addresses()}
    return frozenset(found | {"127.0.0.1", "::1"})


class NodeAgent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.store = MeshStore()
        self.redirector = Redirector(list(config.uplinks), ports=config.ports, fail_open=config.fail_open,
                                     bpffs=config.bpffs, instance=config.node, node_passes=config.node_passes,
                                     proc_sys=config.proc_sys)
        self._tasks: set[asyncio.Task[None]] = set()
        self._identities: set[SpiffeId] = set()
        self._kernel = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kernel")
        self._dirty = asyncio.Event()
        self._closers: list[Callable[[], Coroutine[Any, Any, None]]] = []
        self._kube: KubeSource | None = None

    async def _in_kernel_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._kernel, fn, *args)

    async def _watch_cluster(self) -> None:
        """Fill the store before anything is captured: an agent that cannot tell who is enrolled must not
        capture; then keep it current."""
        cfg = self.config
        # Each source imported only where it is used: an agent loads the lab's YAML state file or the Kubernetes API
        # client, not both (the client costs a lab agent 0.6 MiB, yaml and the state file a cluster's 0.8).
        if cfg.state is not None:
            from agent.sources.statefile import StateFile

            source = StateFile(cfg.state, self.store)
            source.load()
            self._spawn(source.watch())
            return
        from agent.kube.source import KubeSource

        kube = await KubeSource.from_config(cfg.kubeconfig, self.store, context=cfg.kube_context)
        self._kube = kube
        self._closers.append(kube.close)
        self._spawn(kube.run())
        async with asyncio.timeout(cfg.sync_timeout):
            await kube.synced.wait()

    async def start(self) -> None:
        cfg = self.config
        await self._in_kernel_thread(migrate_queued_connections)
        await self._watch_cluster()
        listeners = {kind: transparent_listener(port) for kind, port in
                     ((Listener.OUTBOUND, cfg.ports.outbound), (Listener.INBOUND, cfg.ports.inbound),
                      (Listener.HBONE, cfg.ports.hbone))}
        bundle = TrustBundle(cfg.trust_domain, cfg.trust_bundle.read_bytes())
        self.certificates = CertificateManager(CaClient(cfg.ca_address, bundle, cfg.ca_token), bundle,
                                               trust_bundle_file=cfg.trust_bundle)
        self.pool = Pool(lambda: self.certificates.trust_bundle, dial=dial)
        self.authorizer = Authorizer(self.store)
        self.store.subscribe(self._policies_changed)  # in force before the next accept
        self.telemetry = Telemetry(cfg.node, self.store, cfg.trust_domain, cfg.telemetry)
        self.conntrack = Conntrack(timeout=CONNTRACK_TIMEOUT)  # the node's table: the agent runs in its namespace
        self.mesh = Mesh(cfg.node, cfg.trust_domain, self.store, self.certificates, self.pool,
                         await self._in_kernel_thread(node_addresses), self.telemetry, policy=self.authorizer,
                         original_destination=self.conntrack.original_destination)
        self.inbound = InboundProxy(self.mesh)
        await self.inbound.start(listeners[Listener.HBONE], listeners[Listener.INBOUND])
        self.outbound = OutboundProxy(self.mesh, self.inbound)
        self.outbound.start(listeners[Listener.OUTBOUND])
        await self._in_kernel_thread(self.redirector.start)
        for kind, sock in listeners.items():
            await self._in_kernel_thread(self.redirector.register_listener, kind, sock)
        await self._reconcile(self.store.state)
        self.store.subscribe(self._workloads_changed)
        self._spawn(self._reconcile_forever())
        self.telemetry.watch_kernel(KernelEvents(self.redirector))
        await self.telemetry.start(self._ready, self._config_dump)
        self._spawn(self._gauges_forever())
        self._spawn(self._trim_heap_while_idle())

    def _policies_changed(self, state: MeshState, change: Change) -> None:
        if change.objects:
            self.authorizer.update(state)

    def _workloads_changed(self, _state: MeshState, change: Change) -> None:
        if change.workloads:
            self._dirty.set()

    async def _reconcile_forever(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                await self._reconcile(self.store.state)
            except Exception:
                log.exception("reconcile failed; retrying on the next change or in 1 s")
                await asyncio.sleep(1)
                self._dirty.set()

    def _attach(self, local: list[Workload]) -> tuple[set[str], dict[str, str]]:
        """In the kernel thread: capture exactly ``local``'s enrolled pods (every address of each), steer replies
        for the others (``capture_plan``)."""
        plan = capture_plan(local, host_ifname_for)
        for workload, why in plan.missing:
            log.warning("pod %s (%s): no interface on this node: %s", workload.key, workload.ip, why)
        before = set(self.redirector.enrolled())
        self.redirector.reconcile(plan.capture, plan.hooked)
        self.redirector.set_probe_ports(plan.probe_ports)
        return before, plan.capture

    async def _reconcile(self, new: MeshState) -> None:
        """Capture follows enrollment; identities of local enrolled workloads are fetched ahead of use."""
        local = new.on_node(self.config.node)
        before, desired = await self._in_kernel_thread(self._attach, local)
        for ip in sorted(set(desired) - before):
            log.info("enrolled %s (%s)", new.workloads[ip].key, ip)
        for ip in sorted(before - set(desired)):
            log.info("released %s (%d proxied connections reset)", ip, self.mesh.connections.release(ip))
        identities = {w.identity(self.config.trust_domain) for w in local if w.enrolled}
        for identity in identities - self._identities:
            self._spawn(self._prefetch(identity))
        for identity in self._identities - identities:
            self.certificates.forget(identity)
        self._identities = identities

    def _ready(self) -> tuple[bool, str]:
        """Ready: programs attached, and a certificate for every enrolled workload of this node."""
        if not self.redirector.enrolled() and any(w.enrolled for w in self.store.state.on_node(self.config.node)):
            return False, "eBPF programs not attached yet"
        missing = sorted(str(s.identity) for s in self.certificates.status()
                         if s.identity in self._identities and s.state not in ("available", "renewing"))
        return (False, f"no certificate yet for {', '.join(missing)}") if missing else (True, "ready")

    async def _config_dump(self) -> dict[str, Any]:
        attachments = await self._in_kernel_thread(self.redirector.attachments)
        state = self.store.state
        return {
            "node": self.config.node,
            "version": __version__,
            "workloads": [views.workload(w) for w in state.by_uid.values()],
            "services": [views.service(s, state.endpoints.get(s.key, {})) for s in state.services.values()],
            "policies": self.authorizer.engine.policies,
            "certificates": [s.as_dict() for s in self.certificates.status()],
            "attachments": [{"ifindex": a.ifindex, "backend": a.backend, "program": a.prog_name} for a in attachments],
            "captured": self.redirector.enrolled(),
            "connections": self.mesh.connections.count(),
        }

    async def _gauges_forever(self, every: float = 5.0) -> None:
        while True:
            attachments = await self._in_kernel_thread(self.redirector.attachments)
            self.telemetry.update_gauges([(a.prog_name, a.backend) for a in attachments], self.certificates.status())
            await asyncio.sleep(every)

    async def _trim_heap_while_idle(self, every: float = 10.0) -> None:
        """Every ``every`` s that no connection is proxied, give the C heap's free pages back (agent.node.heap)."""
        while True:
            await asyncio.sleep(every)
            if self.mesh.connections.count() == 0:
                await self._in_kernel_thread(heap.trim)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _prefetch(self, identity: SpiffeId) -> None:
        with contextlib.suppress(Exception):  # failures are logged by the manager, which keeps retrying
            await self.certificates.get(identity)

    async def uninstalling(self) -> bool:
        """Is Ambit being removed from the cluster (the agent's DaemonSet gone or being deleted)? Then the
        agent should release the node on its way out; otherwise (an upgrade, a crash) it keeps it fail-closed."""
        if self._kube is None or self.config.daemonset is None:
            return False
        from agent.kube.lifecycle import daemonset_removed  # the client is loaded: self._kube is one

        removed = await daemonset_removed(self._kube.connection.api, *self.config.daemonset)
        log.info("DaemonSet %s/%s %s", *self.config.daemonset,
                 "is being deleted: releasing the node" if removed else "stays: keeping the node fail-closed")
        return removed

    async def drain(self, seconds: float) -> int:
        """Hand over to the next agent (an upgrade) and give the proxied connections up to ``seconds`` to
        finish. The listeners close, so new connections reach the next agent (which binds the same ports:
        SO_REUSEPORT) or, if there is none, fail closed as with the agent gone; this agent stops touching the
        kernel state the next one adopts, and leaves it the admin ports. Returns how many were still open."""
        for task in list(self._tasks):
            task.cancel()  # the reconcile and gauge loops: the next agent owns the kernel state now
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.outbound.stop_accepting()
        await self.inbound.stop_accepting()
        await self.telemetry.stop_serving_admin()
        left = await self.mesh.connections.wait_empty(seconds)
        log.info("drained: %d proxied connections still open after %.0f s", left, seconds)
        return left

    async def close(self, release: bool = False) -> None:
        """Stop. Unless ``release``, the programs stay: enrolled pods fail closed until an agent returns."""
        for closer in self._closers:
            await closer()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.telemetry.close()
        await self.outbound.close()
        await self.inbound.close()
        await self.pool.close()
        await self.certificates.close()
        await self._in_kernel_thread(self.redirector.close, release)
        self.conntrack.close()
        self._kernel.shutdown()
