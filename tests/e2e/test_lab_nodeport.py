"""NodePort Services in the lab, as kube-proxy's nftables mode serves them, on a real lab with its agents (lab
defaults, nothing enrolled); and pods' probes reaching the agents' store through the state file.

Layout: 2 nodes, 2 pods each, all in ``default``. Every pod runs a server on 8080 that answers, as soon as a
connection is accepted, ``<its name> <the peer's address>``: who answered and whom it saw. The backend of every
Service is app-1-1 on node-1 (label ``app: app-1-1``):
``web`` (NodePort 30080 given, externalTrafficPolicy Cluster), ``auto`` (node port allocated), ``local``
(NodePort 30081, externalTrafficPolicy Local) and ``empty`` (NodePort 30082, selecting nothing).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.capture import netns
from agent.lab.runtime import NodeInfo, PodInfo
from tests.fixtures import lab_helpers as h
from tests.fixtures import lab_observe as lo
from tests.fixtures.eventually import eventually_sync

pytestmark = lo.lab_marks()

BACKEND = "app-1-1"
WEB, LOCAL, EMPTY = 30080, 30081, 30082
DROPPED_AFTER = 2.0  # seconds without a SYN-ACK: the connection was dropped (a refusal comes at once)


class WhoServer(h.PodServer):
    """Answers ``<pod name> <peer address>`` and closes."""

    def serve(self, conn: socket.socket, peer: tuple[str, int], port: int) -> None:
        conn.sendall(f"{self.pod.name} {peer[0]}\n".encode())


def ask(ns: str, address: tuple[str, int], timeout: float = 5.0) -> str:
    """From a socket made in namespace ``ns``: the server's answer, or how the connection failed."""
    with netns.entered(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with sock:
        sock.settimeout(timeout)
        try:
            sock.connect(address)
            return sock.recv(256).decode().strip()
        except ConnectionRefusedError:
            return "refused"
        except ConnectionResetError:
            return "reset"
        except TimeoutError:
            return "timeout"


def node_port_service(name: str, node_port: int | None = None, selector: str = BACKEND,
                      policy: str | None = None) -> dict[str, Any]:
    port: dict[str, Any] = {"name": "http", "port": 80, "targetPort": h.SERVER_PORT}
    if node_port:
        port["nodePort"] = node_port
    spec: dict[str, Any] = {"type": "NodePort", "selector": {"app": selector}, "ports": [port]}
    if policy:
        spec["externalTrafficPolicy"] = policy
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"}, "spec": spec}


class NodePortLab(lo.RunningLab):
    tmp: Path

    def apply(self, *objects: dict[str, Any]) -> str:
        res = lo.lab_apply(self.name, self.tmp, "\n---\n".join(json.dumps(o) for o in objects) + "\n")
        assert res.returncode == 0, res.stderr
        return res.stdout

    def node(self, name: str) -> NodeInfo:
        return self.info.node(name)

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = json.loads(lo.ambit_ok("lab", "--name", self.name, "status", "--json"))
        return status


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodePortLab]:
    with h.running_lab("lnp", nodes=2, pods=2, namespaces=("default",)) as (info, paths):
        lab = NodePortLab(info, paths)
        lab.tmp = tmp_path_factory.mktemp("lab-nodeport")
        servers = [WhoServer(p).start() for p in info.pods]
        try:
            out = lab.apply(node_port_service("web", WEB), node_port_service("auto"),
                            node_port_service("local", LOCAL, policy="Local"),
                            node_port_service("empty", EMPTY, selector="nobody"))
            assert out.split() == ["service/web", "created", "service/auto", "created", "service/local", "created",
                                   "service/empty", "created"]
            yield lab
        finally:
            for server in servers:
                server.close()


def test_status_shows_the_node_ports_and_the_agents_know_them(lab: NodePortLab) -> None:
    found = {s["name"]: s for s in lab.status()["services"]}
    assert {name: [p["node_port"] for p in s["ports"]] for name, s in found.items()} == {
        "auto": [30086], "empty": [EMPTY], "local": [LOCAL], "web": [WEB]}  # auto: above the static band
    assert found["local"]["external_traffic_policy"] == "Local" and found["web"]["external_traffic_policy"] == "Cluster"
    text = lo.ambit_ok("lab", "--name", lab.name, "status")
    row = next(line for line in text.splitlines() if line.startswith("default/web "))
    assert row.split()[2] == f"80:{WEB}->8080/TCP", row

    def agents_know() -> bool:
        return all({s["name"]: [p["node_port"] for p in s["ports"]] for s in lo.config_dump(lab.paths, n)["services"]}
                   .get("web") == [WEB] for n in lab.nodes)
    eventually_sync(agents_know, "the agents' store has the node ports", within=10, interval=0.1)


def test_a_pod_on_node_2_reaches_node_1s_pod_through_either_nodes_node_port(lab: NodePortLab) -> None:
    """externalTrafficPolicy Cluster: masqueraded, so the endpoint sees the address of the node that forwarded."""
    client = lab.pod("app-2-1")
    node1, node2 = lab.node("node-1"), lab.node("node-2")
    for _ in range(3):
        assert ask(client.netns, (node1.ip, WEB)) == f"{BACKEND} {node1.ip}"
        assert ask(client.netns, (node2.ip, WEB)) == f"{BACKEND} {node2.ip}"
    assert ask(client.netns, (node1.ip, 30086)) == f"{BACKEND} {node1.ip}"  # the allocated one works alike
    # and the pod itself is not reached by its own node's address on another port
    assert ask(client.netns, (node2.ip, 30099)) == "refused"


def test_the_node_itself_reaches_its_node_ports_but_not_on_localhost(lab: NodePortLab) -> None:
    """A process in a node's network namespace (a hostNetwork pod): the node's address works, from node-1 and
    node-2; 127.0.0.1 does not, as in kube-proxy's nftables mode (no route_localnet): nothing listens there."""
    for node in (lab.node("node-1"), lab.node("node-2")):
        assert ask(node.netns, (node.ip, WEB)) == f"{BACKEND} {node.ip}"
        assert ask(node.netns, ("127.0.0.1", WEB)) == "refused"


def test_external_traffic_policy_local_keeps_the_source_and_drops_without_a_local_endpoint(lab: NodePortLab) -> None:
    node1, node2 = lab.node("node-1"), lab.node("node-2")
    # from outside node-1 (a process on node-2, neither a pod nor node-1 itself): to node-1, which has the endpoint
    assert ask(node2.netns, (node1.ip, LOCAL)) == f"{BACKEND} {node2.ip}"  # no masquerade: the client's address
    assert ask(node1.netns, (node2.ip, LOCAL), timeout=DROPPED_AFTER) == "timeout"  # node-2 has none: dropped
    # node-2 itself too: kube-proxy's filter output chain checks before its NAT output chain could short-cut it
    assert ask(node2.netns, (node2.ip, LOCAL), timeout=DROPPED_AFTER) == "timeout"
    assert ask(node1.netns, (node1.ip, LOCAL)) == f"{BACKEND} {node1.ip}"  # node-1 has one (masqueraded: its own)
    # kube-proxy's short cut for the cluster's pods: any endpoint, the pod's own address kept
    client: PodInfo = lab.pod("app-2-1")
    assert ask(client.netns, (node2.ip, LOCAL)) == f"{BACKEND} {client.ip}"


def test_a_node_port_without_endpoints_is_refused_at_once(lab: NodePortLab) -> None:
    client = lab.pod("app-2-1")
    for node in ("node-1", "node-2"):
        assert ask(client.netns, (lab.node(node).ip, EMPTY), timeout=1.0) == "refused"


PROBED_POD: dict[str, Any] = {
    "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "app-1-2", "namespace": "default"},
    "spec": {"containers": [{"name": "app", "image": "app:1",
                             "ports": [{"name": "http", "containerPort": h.SERVER_PORT},
                                       {"name": "admin", "containerPort": 9901}],
                             "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}},
                             "livenessProbe": {"tcpSocket": {"port": "admin"}},
                             "startupProbe": {"httpGet": {"port": "nonesuch"}}}]}}


def test_a_pods_probes_reach_the_agents_store(lab: NodePortLab) -> None:
    res = lo.lab_apply(lab.name, lab.tmp, json.dumps(PROBED_POD) + "\n")
    assert res.returncode == 0 and res.stdout.strip() == "pod/app-1-2 configured", res
    # the probe naming no port is that probe's problem: reported (the store's log), the others count
    assert "spec.containers[0].startupProbe.httpGet.port 'nonesuch': container 'app' has no port" in res.stderr

    def probe_ports(node: str) -> dict[str, list[int]]:
        return {w["name"]: w["probe_ports"] for w in lo.config_dump(lab.paths, node)["workloads"]}
    eventually_sync(lambda: all(probe_ports(n).get("app-1-2") == [h.SERVER_PORT, 9901] for n in lab.nodes),
                    "the agents' store has app-1-2's probe ports", within=10, interval=0.1)
    assert probe_ports("node-1")["app-1-1"] == []
    pods = {p["name"]: p for p in lab.status()["pods"]}
    assert pods["app-1-2"]["probe_ports"] == [h.SERVER_PORT, 9901]
    assert pods["app-1-2"]["labels"] == {"app": "app-1-2"} and pods["app-1-2"]["ip"] == lab.pod("app-1-2").ip
    # what the lab made stays: a Pod moving app-1-2 to node-2 is refused, naming the field
    moved = {**PROBED_POD, "spec": {**PROBED_POD["spec"], "nodeName": "node-2"}}
    res = lo.lab_apply(lab.name, lab.tmp, json.dumps(moved) + "\n")
    assert res.returncode == 1 and "Pod default/app-1-2: spec.nodeName: field is immutable (node-1, not 'node-2')" \
        in res.stderr, res.stderr
