"""The cluster code path on a lab, with only the API server faked: agents started with ``--kubernetes`` inside
the lab's node namespaces enroll lab pods from Kubernetes objects and carry their traffic end to end.

What runs:
- a lab (agent/lab/control.py, ``agents=False``): node-1 and node-2, one pod each (``demo/app-1-1``,
  ``demo/app-2-1``), as network namespaces;
- the API-server fake (tests/fixtures/kube_fake.py) in this process, with TokenReviews
  (tests/fixtures/token_reviews.py) and a bearer token of its own; the node namespaces reach it through a TCP
  forwarder listening on node-1's address inside node-1's namespace;
- Ambit's CA as the Deployment runs it (``python -m agent.ca --kubernetes``), in node-1's namespace;
- one agent per node as the DaemonSet runs it (``python -m agent run --kubernetes``, a kubeconfig for the
  fake, a bound ServiceAccount token for the CA), with exactly the capabilities the DaemonSet grants (read
  from daemonset/base/agent.yaml; ``setpriv`` drops every other one from the bounding set).

The proof: with the namespace labelled ambient in the fake, pod -> pod traffic works, while it is open node-1
holds a TCP connection to the destination pod's port 15008 (HBONE), and the CA issued both pods' identities
to their own nodes (node-2's token names no node: the CA found it from the bound pod). Relabelling the
namespace in the fake releases the pods: the proxied connection is reset, and a new one goes direct. The lab
and everything started here are always torn down.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import secrets
import shutil
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from agent.capture import netns
from agent.lab import control
from agent.lab import runtime as rt
from agent.lab.runtime import LabInfo, LabPaths, NodeInfo, PodInfo
from agent.mesh.model import Address
from tests.fixtures.eventually import eventually
from tests.fixtures.kube_fake import FakeApiServer, namespace, pod
from tests.fixtures.lab_helpers import PodServer
from tests.fixtures.machine import needs_bcc
from tests.fixtures.repo import REPO
from tests.fixtures.token_reviews import TokenReviews

T = TypeVar("T")
AMBIENT = {"istio.io/dataplane-mode": "ambient"}
SERVER_PORT = 8080
CA_PORT = 15112  # the lab's own (file-based) CA keeps 15012 on node-1
IO_TIMEOUT = 10.0


pytestmark = [
    needs_bcc,
    pytest.mark.skipif(shutil.which("setpriv") is None or shutil.which("ss") is None, reason="needs setpriv and ss"),
    pytest.mark.timeout(180),
]


def daemonset_capabilities() -> list[str]:
    """The capabilities daemonset/base/agent.yaml adds to the agent's container."""
    (ds,) = [d for d in yaml.safe_load_all((REPO / "daemonset" / "base" / "agent.yaml").read_text())
             if d and d["kind"] == "DaemonSet"]
    (container,) = ds["spec"]["template"]["spec"]["containers"]
    return list(container["securityContext"]["capabilities"]["add"])


# -- the API server as the node namespaces see it --------------------------------------------------------------
class Forwarder:
    """Listens on node-1's address inside node-1's namespace; relays each connection to the fake on 127.0.0.1
    of this (the host's) namespace, where this event loop's sockets are made."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, ns: str, ip: str) -> Forwarder:
        with netns.entered(ns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((ip, 0))
        sock.listen(64)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        self._server = await asyncio.start_server(self._relay, sock=sock)
        return self

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            self._tasks.discard(task)
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(OSError):
                dst.close()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            self._tasks.discard(task)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


# -- pods' traffic ----------------------------------------------------------------------------------------------
class RawEcho(PodServer):
    """Echoes each connection's bytes until EOF."""

    def serve(self, conn: socket.socket, peer: Address, port: int) -> None:
        while data := conn.recv(65536):
            conn.sendall(data)


def connect(src: PodInfo, dst: PodInfo) -> socket.socket:
    with netns.entered(src.netns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(IO_TIMEOUT)
    sock.connect((dst.ip, SERVER_PORT))
    return sock


def exchange(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"EOF after {len(got)} of {len(payload)} bytes")
        got += chunk
    return got


def hbone_connections(node: NodeInfo, dst: PodInfo) -> list[str]:
    """Established TCP connections of the node's namespace to ``dst``'s HBONE port."""
    out = netns.run(node.netns, ["ss", "-Htn", "state", "established", "dst", f"{dst.ip}:15008"]).stdout
    return [line for line in out.splitlines() if line.strip()]


def proxied_sockets(node: NodeInfo, dst: PodInfo) -> list[str]:
    """The agent's sockets in the node's namespace for connections to ``dst``'s server: the outbound side
    accepts with ``dst``'s address as its own (the original destination), the inbound side connects to it.
    Traffic routed straight through the node has no socket there."""
    target = f"{dst.ip}:{SERVER_PORT}"
    out = netns.run(node.netns, ["ss", "-Htn", "state", "established", "(", "dst", target, "or", "src", target,
                                 ")"]).stdout
    return [line for line in out.splitlines() if line.strip()]


def get(node: NodeInfo, path: str, port: int) -> tuple[int, bytes]:
    """An HTTP GET to the node's own address, made from inside its namespace."""
    def call() -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1" if port == 15000 else node.ip, port, timeout=5)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()
    return netns.call(node.netns, call)


# -- the lab ----------------------------------------------------------------------------------------------------
@dataclass
class KubeLab:
    info: LabInfo
    paths: LabPaths
    api: FakeApiServer
    reviews: TokenReviews

    def node(self, name: str) -> NodeInfo:
        return self.info.node(name)

    def pod(self, name: str) -> PodInfo:
        return next(p for p in self.info.pods if p.name == name)

    def log(self, proc: str) -> str:
        path = self.paths.log_file(proc)
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self) -> str:
        """The end of every process's log, for a failure's message."""
        procs = ["ca-kube", *(rt.agent_proc(n.name) for n in self.info.nodes)]
        return "\n".join(f"--- {proc}:\n{rt.tail(self.log(proc), 25)}" for proc in procs)

    def dump(self, node: str) -> dict[str, Any]:
        status, body = get(self.node(node), "/config_dump", 15000)
        assert status == 200, body
        result: dict[str, Any] = json.loads(body)
        return result


@contextlib.asynccontextmanager
async def kube_lab(tmp_path: Path) -> AsyncIterator[KubeLab]:
    name = f"kube-{secrets.token_hex(3)}"
    api = FakeApiServer(token=secrets.token_urlsafe(16))
    reviews = TokenReviews(api)
    await api.start()
    forwarder: Forwarder | None = None
    try:
        info = await asyncio.to_thread(control.up, name, nodes=2, pods=1, namespaces=("demo",), agents=False,
                                       timeout=60)
        paths = LabPaths.of(name)
        forwarder = await Forwarder(api.port).start(info.node("node-1").netns, info.node("node-1").ip)
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "lab",
            "clusters": [{"name": "lab", "cluster": {"server": f"http://{info.node('node-1').ip}:{forwarder.port}"}}],
            "users": [{"name": "lab", "user": {"token": api.token}}],
            "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": "lab"}}]}))
        lab = KubeLab(info, paths, api, reviews)
        populate(lab)
        await start_ca_and_agents(lab, kubeconfig, tmp_path)
        yield lab
    finally:
        await asyncio.to_thread(control.down, name, timeout=5)
        if forwarder is not None:
            await forwarder.close()
        await api.close()
        left = [n for n in netns.list_netns() if n.startswith(rt.netns_prefix(name))]
        assert not left and not LabPaths.of(name).root.exists(), f"lab {name} left {left}"


def populate(lab: KubeLab) -> None:
    """The cluster as the fake serves it: the namespaces (demo enrolled), the lab's pods, the agents' pods."""
    lab.api.create(namespace("demo", AMBIENT))
    for ns in ("istio-system", "ambit-system"):
        lab.api.create(namespace(ns))
    for p in lab.info.pods:
        lab.api.create(pod(p.name, p.namespace, ip=p.ip, node=p.node, service_account=p.service_account,
                           labels={"app": p.name}))
    for node in lab.info.nodes:
        agent = pod(f"ambit-agent-{node.name}", "ambit-system", ip=node.ip, node=node.name,
                    service_account="ambit-agent", labels={"app.kubernetes.io/name": "ambit-agent"})
        agent["metadata"]["uid"] = f"uid-{node.name}"
        agent["spec"]["hostNetwork"] = True
        lab.api.create(agent)


async def start_ca_and_agents(lab: KubeLab, kubeconfig: Path, tmp_path: Path) -> None:
    node1 = lab.node("node-1")
    ca_dir = tmp_path / "ca"
    ca = rt.spawn(lab.paths, "ca-kube", node1.netns, [
        sys.executable, "-m", "agent.ca", "--kubernetes", "--kubeconfig", str(kubeconfig), "--dir", str(ca_dir),
        "--trust-domain", lab.info.trust_domain, "--listen", f"{node1.ip}:{CA_PORT}"])
    await asyncio.to_thread(control.wait_ready, [ca], rt.CA_READY, 30)
    bounding = ",".join(["-all", *(f"+{cap.lower()}" for cap in daemonset_capabilities())])
    recs = []
    for node in lab.info.nodes:
        # node-1's token carries the node-name extra (Kubernetes >= 1.30); node-2's only its bound pod.
        token = lab.reviews.bound("ambit-system", "ambit-agent", pod=f"ambit-agent-{node.name}",
                                  pod_uid=f"uid-{node.name}", node=node.name, with_node=node.name == "node-1")
        token_file = tmp_path / f"token-{node.name}"
        token_file.write_text(token + "\n")
        lab.paths.observer_socket(node.name).parent.mkdir(parents=True, exist_ok=True)
        recs.append(rt.spawn(lab.paths, rt.agent_proc(node.name), node.netns, [
            "setpriv", "--bounding-set", bounding, "--inh-caps", "-all",
            sys.executable, "-m", "agent", "run", "--node", node.name, "--kubernetes", "--kubeconfig", str(kubeconfig),
            "--ca", f"{node1.ip}:{CA_PORT}", "--ca-token", str(token_file),
            "--trust-bundle", str(ca_dir / "root-cert.pem"), "--trust-domain", lab.info.trust_domain,
            "--uplink", node.uplink, "--observer-socket", str(lab.paths.observer_socket(node.name)),
            "--observer-listen", ""]))
    await asyncio.to_thread(control.wait_ready, recs, rt.AGENT_READY, 60)


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[KubeLab]:
    async with kube_lab(tmp_path) as lab:
        yield lab


@contextlib.contextmanager
def echo_server(pod: PodInfo) -> Iterator[RawEcho]:
    server = RawEcho(pod, SERVER_PORT).start()
    try:
        yield server
    finally:
        server.close()


async def test_agents_with_kubernetes_enroll_lab_pods_and_carry_their_traffic(lab: KubeLab) -> None:
    try:
        await carries_traffic(lab)
    except BaseException as e:
        e.add_note(lab.logs())
        raise


async def carries_traffic(lab: KubeLab) -> None:
    a, b = lab.pod("app-1-1"), lab.pod("app-2-1")
    node1, node2 = lab.node("node-1"), lab.node("node-2")
    # Enrolled from the Kubernetes objects: each agent captures its own pod, on the veth it found from the route.
    await eventually(lambda: lab.dump("node-1")["captured"] == {a.ip: a.host_ifname}
                and lab.dump("node-2")["captured"] == {b.ip: b.host_ifname}, "each agent captures its node's pod",
                     within=20, interval=0.1, blocking=True)
    # Ready (readiness probe's endpoint): programs attached and a certificate for the enrolled pod, from the
    # CA that checked each agent's token with a TokenReview.
    await eventually(lambda: get(node1, "/healthz/ready", 15021)[0] == 200
                     and get(node2, "/healthz/ready", 15021)[0] == 200,
                     "both agents ready", within=20, interval=0.1, blocking=True)
    ca_log = lab.log("ca-kube")
    assert "node=node-1 identity=spiffe://cluster.local/ns/demo/sa/app-1-1" in ca_log
    assert "node=node-2 identity=spiffe://cluster.local/ns/demo/sa/app-2-1" in ca_log  # from the bound pod
    assert lab.reviews.requests and all(r["spec"]["audiences"] == ["ambit-ca"] for r in lab.reviews.requests)

    with echo_server(b) as server:
        sock = await asyncio.to_thread(connect, a, b)
        try:
            payload = secrets.token_bytes(64 << 10)
            assert await asyncio.to_thread(exchange, sock, payload) == payload
            # Through the agents: node-1 took the connection in and carries it to b's HBONE port; node-2's agent
            # made the last hop (b sees a's own address).
            assert await asyncio.to_thread(hbone_connections, node1, b), "no HBONE connection node-1 -> b:15008"
            assert await asyncio.to_thread(proxied_sockets, node1, b), "node-1's agent did not accept it"
            assert await asyncio.to_thread(proxied_sockets, node2, b), "node-2's agent did not connect to b"
            assert [ip for ip, _ in server.peers] == [a.ip]
            assert lab.dump("node-1")["connections"] >= 1

            # Relabel in the fake: both agents release their pods; the proxied connection is reset.
            lab.api.update(namespace("demo", {}))
            await eventually(lambda: not lab.dump("node-1")["captured"] and not lab.dump("node-2")["captured"],
                             "both agents release their pods", within=20, interval=0.1, blocking=True)
            with pytest.raises((ConnectionError, OSError)):
                for _ in range(3):  # the reset may land after the first send
                    await asyncio.to_thread(exchange, sock, b"after release")
        finally:
            sock.close()

        # A new connection now goes direct: it works, and no agent socket is part of it on either node.
        await eventually(lambda: not proxied_sockets(node1, b) and not proxied_sockets(node2, b),
                         "the proxied connection's sockets gone", within=10, interval=0.1, blocking=True)
        sock = await asyncio.to_thread(connect, a, b)
        try:
            assert await asyncio.to_thread(exchange, sock, b"direct now") == b"direct now"
            assert not await asyncio.to_thread(proxied_sockets, node1, b)
            assert not await asyncio.to_thread(proxied_sockets, node2, b)
            assert lab.dump("node-1")["connections"] == 0 and lab.dump("node-2")["connections"] == 0
        finally:
            sock.close()
        assert [ip for ip, _ in server.peers] == [a.ip, a.ip]
    assert "released" in lab.log(rt.agent_proc("node-1")) and "released" in lab.log(rt.agent_proc("node-2"))
