"""The lab's Services as in a cluster, on a real lab: ``ambit lab apply`` gives a Service its cluster IP, each
node's kube-proxy (nftables) takes pods the agents do not capture from the VIP to an endpoint, pods resolve
Service names, ``ambit lab status`` lists Services, ``ambit lab down`` leaves nothing behind. And what the
kube-proxy's NAT does to connections the agents capture.

Layout: 2 nodes, 3 pods each; namespace ``default`` holds app-i-1 and app-i-3, ``shop`` app-i-2. Every pod
runs a small HTTP server on 8080 that answers its own name. The client is app-1-1 (default, never enrolled).
``default/web`` (cluster IP given: 10.96.5.5) selects role=web: app-1-3 (the client's node), app-2-1, app-2-3.
``shop/web`` (cluster IP allocated) selects app-1-2 only; ``default/empty`` selects nothing.
"""

from __future__ import annotations

import json
import secrets
import socket
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.capture import netns
from agent.lab import control, hosts
from agent.lab import runtime as rt
from agent.lab.kubeproxy import TABLE
from agent.lab.runtime import LabPaths, PodInfo
from tests.fixtures import lab_helpers as h
from tests.fixtures import lab_observe as lo

pytestmark = lo.lab_marks()

WEB_VIP = "10.96.5.5"
BACKENDS = ("app-1-3", "app-2-1", "app-2-3")
CLIENT = "app-1-1"
AT_ONCE = 1.0  # seconds: a refusal, not a timeout (a connect timeout is 5 s)

# Connections from inside a pod, in a process `ip netns exec` starts (so that the pod's hosts file is its
# /etc/hosts): one line per attempt, "ok <answer> <seconds>" or "error <exception> <seconds>".
CONNECT = """
import socket, sys, time
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for _ in range(count):
    start = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=5) as s:
            s.sendall(b"GET / HTTP/1.0\\r\\nHost: " + host.encode() + b"\\r\\n\\r\\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        print("ok", data.split(b"\\r\\n\\r\\n", 1)[1].decode().strip(), f"{time.monotonic() - start:.3f}")
    except OSError as e:
        print("error", type(e).__name__, f"{time.monotonic() - start:.3f}")
"""


RESOLVE = """
import json, socket, sys
found = {}
for name in sys.argv[1:]:
    try:
        found[name] = socket.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    except socket.gaierror:
        found[name] = ""
print(json.dumps(found))
"""


class NameServer(h.PodServer):
    """HTTP/1.0: reads a request head, answers the pod's name, closes."""

    def serve(self, conn: socket.socket, peer: tuple[str, int], port: int) -> None:
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 8192:
            chunk = conn.recv(4096)
            if not chunk:
                return
            head += chunk
        body = f"{self.pod.name}\n".encode()
        conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body))


def service_yaml(name: str, namespace: str, selector: dict[str, str], cluster_ip: str | None = None,
                 port: int = 80) -> str:
    spec: dict[str, Any] = {"selector": selector, "ports": [{"name": "http", "port": port,
                                                             "targetPort": h.SERVER_PORT}]}
    if cluster_ip:
        spec["clusterIP"] = cluster_ip
    return json.dumps({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace},
                       "spec": spec}) + "\n"


@dataclass(frozen=True)
class Outcome:
    ok: bool
    what: str  # the answering pod, or the exception's name
    seconds: float


class ServiceLab(lo.RunningLab):
    servers: dict[str, NameServer]
    tmp: Path

    def lab(self, *args: str) -> str:
        return lo.ambit_ok("lab", "--name", self.name, *args)

    def apply(self, text: str) -> str:
        res = lo.lab_apply(self.name, self.tmp, text)
        assert res.returncode == 0, res.stderr
        return res.stdout

    def connect(self, pod: str, host: str, port: int = 80, count: int = 1) -> list[Outcome]:
        out = self.lab("exec", pod, "--", sys.executable, "-c", CONNECT, host, str(port), str(count))
        found = []
        for line in out.splitlines():
            status, what, seconds = line.split()
            found.append(Outcome(status == "ok", what, float(seconds)))
        assert len(found) == count, out
        return found

    def resolve(self, pod: str, *names: str) -> dict[str, str | None]:
        """The IPv4 address each name resolves to inside ``pod`` (None: not found), in one process there."""
        out = self.lab("exec", pod, "--", sys.executable, "-c", RESOLVE, *names)
        return {name: address or None for name, address in json.loads(out).items()}

    def kube_proxy(self, node: str) -> str:
        return netns.run(self.info.node(node).netns, ["nft", "list", "table", "ip", TABLE]).stdout

    def vip(self, key: str) -> str:
        status = json.loads(self.lab("status", "--json"))
        return next(",".join(s["vips"]) for s in status["services"] if f"{s['namespace']}/{s['name']}" == key)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceLab]:
    with h.running_lab("lsvc", nodes=2, pods=3, namespaces=("default", "shop")) as (info, paths):
        lab = ServiceLab(info, paths)
        lab.tmp = tmp_path_factory.mktemp("lab-services")
        lab.servers = {p.name: NameServer(p).start() for p in info.pods}
        try:
            for name in BACKENDS:
                lab.lab("label", "pod", f"default/{name}", "role=web")
            out = lab.apply(service_yaml("web", "default", {"role": "web"}, WEB_VIP)
                            + "---\n" + service_yaml("web", "shop", {"app": "app-1-2"})
                            + "---\n" + service_yaml("empty", "default", {"role": "nobody"}))
            assert out.splitlines() == ["service/web created", "service/web created", "service/empty created"]
            yield lab
        finally:
            for server in lab.servers.values():
                server.close()


# -- apply, status ---------------------------------------------------------------------------------------------------
def test_services_get_cluster_ips_and_status_lists_them(lab: ServiceLab) -> None:
    status = json.loads(lab.lab("status", "--json"))
    services = {f"{s['namespace']}/{s['name']}": s for s in status["services"]}
    assert services["default/web"]["vips"] == [WEB_VIP]  # kept as given
    assert services["shop/web"]["vips"] == ["10.96.0.1"] and services["default/empty"]["vips"] == ["10.96.0.2"]
    assert sorted((e["ip"], e["node"], e["ports"]) for e in services["default/web"]["endpoints"]) == sorted(
        (lab.pod(p).ip, lab.pod(p).node, {"80": h.SERVER_PORT}) for p in BACKENDS)
    assert services["default/empty"]["endpoints"] == [] and status["service_errors"] == []

    text = lab.lab("status")
    row = next(line for line in text.splitlines() if line.startswith("default/web "))
    assert row.split()[:3] == ["default/web", WEB_VIP, "80->8080/TCP"], row
    assert all(f"{lab.pod(p).ip}:{h.SERVER_PORT}" in row for p in BACKENDS), row
    assert any(line.split()[:4] == ["default/empty", "10.96.0.2", "80->8080/TCP", "<none>"]
               for line in text.splitlines()), text


# -- the kube-proxy ----------------------------------------------------------------------------------------------------
def test_a_client_outside_the_mesh_reaches_all_three_endpoints_by_name_and_by_vip(lab: ServiceLab) -> None:
    before = {p: lab.servers[p].accepted for p in BACKENDS}
    by_name = lab.connect(CLIENT, "web", count=30)
    by_vip = lab.connect(CLIENT, WEB_VIP, count=30)
    for outcomes in (by_name, by_vip):
        assert all(o.ok for o in outcomes), outcomes
        served = Counter(o.what for o in outcomes)
        # each endpoint has p = 1/3 per connection: missing one in 30 has probability 3 * (2/3)^30 < 2e-5
        assert set(served) == set(BACKENDS), served
    assert sum(lab.servers[p].accepted - before[p] for p in BACKENDS) == 60
    client_ip = lab.pod(CLIENT).ip
    assert all(peer[0] == client_ip for p in BACKENDS for peer in lab.servers[p].peers[before[p]:]), \
        "the endpoints see the client pod's own address (DNAT only, no SNAT)"
    # as the example has it: curl by the Service's short name
    answer = lab.lab("exec", CLIENT, "--", "curl", "-sS", "--max-time", "5", "http://web/")
    assert answer.strip() in BACKENDS


def test_a_service_without_endpoints_and_an_unknown_port_are_refused_at_once(lab: ServiceLab) -> None:
    """Every time: 10 back to back (kube-proxy's ICMP would be rate-limited after 6, see agent/lab/kubeproxy.py)."""
    for host, port in (("empty", 80), ("web", 81)):
        outcomes = lab.connect(CLIENT, host, port, count=10)
        assert all(not o.ok and o.what == "ConnectionRefusedError" and o.seconds < AT_ONCE for o in outcomes), \
            (host, port, outcomes)


def test_a_pod_reaches_itself_through_its_service(lab: ServiceLab) -> None:
    """Hairpin: app-1-2 is shop/web's only endpoint; without masquerading its reply would skip the NAT."""
    outcomes = lab.connect("app-1-2", "web", count=3)
    assert [o.what for o in outcomes] == ["app-1-2"] * 3, outcomes


def test_names_resolve_as_in_a_cluster(lab: ServiceLab) -> None:
    shop_vip = lab.vip("shop/web")
    assert lab.resolve(CLIENT, "web", "web.default", "web.default.svc", "web.default.svc.cluster.local", "empty",
                       "web.shop", "web.shop.svc.cluster.local", "nothing", "nothing.default") == {
        "web": WEB_VIP, "web.default": WEB_VIP, "web.default.svc": WEB_VIP, "web.default.svc.cluster.local": WEB_VIP,
        "empty": "10.96.0.2", "web.shop": shop_vip, "web.shop.svc.cluster.local": shop_vip, "nothing": None,
        "nothing.default": None}
    # a short name is the pod's own namespace's Service
    assert lab.resolve("app-1-2", "web", "web.default", "empty", "empty.default") == {
        "web": shop_vip, "web.default": WEB_VIP, "empty": None, "empty.default": "10.96.0.2"}
    # a name nobody has fails at once (no DNS server in the lab to wait for), also in `getent`'s IPv6-first lookup
    started = time.monotonic()
    missing = lo.ambit("lab", "--name", lab.name, "exec", CLIENT, "--", "getent", "hosts", "nothing.default")
    assert missing.returncode == 2 and time.monotonic() - started < 5.0


def test_changes_follow_the_state(lab: ServiceLab) -> None:
    """A new endpoint, a deleted Service: the kube-proxy tables and the hosts files follow each command."""
    lab.lab("label", "pod", "default/app-1-1", "role=web")
    try:
        for node in lab.nodes:
            assert "numgen random mod 4" in lab.kube_proxy(node)
        assert "app-1-1" in {o.what for o in lab.connect("app-2-1", "web.default", count=30)}
    finally:
        lab.lab("label", "pod", "default/app-1-1", "role-")
    assert all("numgen random mod 3" in lab.kube_proxy(node) for node in lab.nodes)

    assert lab.lab("delete", "svc", "empty", "-n", "default").strip() == 'service "empty" deleted'
    try:
        assert lab.resolve(CLIENT, "empty") == {"empty": None}
        assert all("10.96.0.2" not in lab.kube_proxy(node) for node in lab.nodes)
    finally:
        lab.apply(service_yaml("empty", "default", {"role": "nobody"}, "10.96.0.2"))
    assert lab.resolve(CLIENT, "empty") == {"empty": "10.96.0.2"}


def test_a_service_without_selector_takes_its_endpoint_slices(lab: ServiceLab) -> None:
    legacy = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "legacy", "namespace": "default"},
              "spec": {"ports": [{"port": 80, "protocol": "TCP"}]}}
    backend = lab.pod("app-2-3")
    slice_ = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
              "metadata": {"name": "legacy-1", "namespace": "default",
                           "labels": {"kubernetes.io/service-name": "legacy"}},
              "ports": [{"port": h.SERVER_PORT, "protocol": "TCP"}],
              "endpoints": [{"addresses": [backend.ip], "nodeName": backend.node}]}
    out = lab.apply(json.dumps(legacy) + "\n---\n" + json.dumps(slice_) + "\n")
    assert out.splitlines() == ["service/legacy created", "endpointslice.discovery.k8s.io/legacy-1 created"]
    try:
        assert [o.what for o in lab.connect(CLIENT, "legacy", count=5)] == ["app-2-3"] * 5
        assert lab.lab("delete", "endpointslice", "legacy-1").strip() == \
            'endpointslice.discovery.k8s.io "legacy-1" deleted'
        refused = lab.connect(CLIENT, "legacy")[0]
        assert refused.what == "ConnectionRefusedError" and refused.seconds < AT_ONCE, refused
    finally:
        lab.lab("delete", "service", "legacy")


def test_an_invalid_service_is_refused_naming_object_and_field_and_the_rest_keeps_working(lab: ServiceLab) -> None:
    bad_port = service_yaml("bad", "default", {"role": "web"}, port=0)
    taken = service_yaml("thief", "default", {"role": "web"}, WEB_VIP)
    good = service_yaml("good", "default", {"role": "web"})
    for batch, message in ((good + "---\n" + bad_port,
                            "Service default/bad: spec.ports[0].port must be a port number 1-65535, not 0"),
                           (taken, f"Service default/thief: spec.clusterIP {WEB_VIP} is already allocated to "
                                   "Service default/web"),
                           (service_yaml("web", "default", {"role": "web"}, "10.96.9.9"),
                            "Service default/web: spec.clusterIP: field is immutable")):
        res = lo.lab_apply(lab.name, lab.tmp, batch)
        assert res.returncode == 1 and message in res.stderr, res.stderr
        assert res.stdout == ""
    status = json.loads(lab.lab("status", "--json"))
    assert sorted(f"{s['namespace']}/{s['name']}" for s in status["services"]) == [
        "default/empty", "default/web", "shop/web"]  # nothing of a refused batch was applied
    assert all(o.ok for o in lab.connect(CLIENT, "web", count=3))


# -- captured connections meet the kube-proxy's NAT --------------------------------------------------------------------
@pytest.fixture
def enrolled_shop(lab: ServiceLab) -> Iterator[PodInfo]:
    """shop enrolled; its pod app-1-2 (node-1) is the client."""
    lab.lab("label", "namespace", "shop", "istio.io/dataplane-mode=ambient")
    try:
        lo.wait_agents(lab.paths, lab.nodes, captured={"node-1": {lab.pod("app-1-2").ip},
                                                      "node-2": {lab.pod("app-2-2").ip}})
        yield lab.pod("app-1-2")
    finally:
        lab.lab("label", "namespace", "shop", "istio.io/dataplane-mode-")
        lo.wait_agents(lab.paths, lab.nodes, captured={})


def vip_flows(lab: ServiceLab, client: PodInfo) -> list[dict[str, Any]]:
    """The proxies' flows (not the kernel's SYN events) of ``client`` to default/web."""
    flows = lo.flows(lo.observe(lab.name, "--from-pod", client.key, "--all"))
    return [f for f in flows if f.get("event_type") != "KERNEL"
            and f.get("destination_service", {}).get("name") == "web"]


def test_an_enrolled_client_reaches_the_agent_with_the_vip(lab: ServiceLab, enrolled_shop: PodInfo) -> None:
    with h.Client(enrolled_shop, (WEB_VIP, 80)) as client:
        client.sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert client.sock.recv(4096).startswith(b"HTTP/1.0 200 OK")
    assert vip_flows(lab, enrolled_shop)


def test_the_agents_keep_their_steered_packets_out_of_conntrack(lab: ServiceLab) -> None:
    """Why the test above works on a node with kube-proxy: a socket assignment does not exempt a packet from
    netfilter, so the agent's table makes what it steered (mark 0x539) skip conntrack, and NAT, at raw priority."""
    for node in lab.info.nodes:
        table = netns.run(node.netns, ["nft", "list", "table", "inet", "ambit"]).stdout
        assert "hook prerouting priority raw" in table and "meta mark 0x00000539 notrack" in table, table


def http_outcome(client: PodInfo, address: tuple[str, int]) -> str:
    """"answered" (HTTP 200 from the server), or how it was refused: "refused", "reset", "eof", "timeout"."""
    try:
        with h.Client(client, address) as c:
            c.sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            data = c.sock.recv(4096)
    except ConnectionRefusedError:
        return "refused"
    except ConnectionResetError:
        return "reset"
    except TimeoutError:
        return "timeout"
    return "answered" if data.startswith(b"HTTP/1.0 200 OK") else "eof" if not data else f"other: {data[:40]!r}"


@pytest.fixture
def strict_shop(lab: ServiceLab, enrolled_shop: PodInfo) -> Iterator[PodInfo]:
    """shop enrolled and STRICT: its pods take mutual TLS only."""
    strict = ('{"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication", '
              '"metadata": {"name": "strict", "namespace": "shop"}, "spec": {"mtls": {"mode": "STRICT"}}}\n')
    lab.apply(strict)
    try:
        lo.wait_agents(lab.paths, lab.nodes, policies=["PeerAuthentication shop/strict"])
        yield enrolled_shop
    finally:
        lab.lab("delete", "peerauthentication", "strict", "-n", "shop")
        lo.wait_agents(lab.paths, lab.nodes, policies=[])


def test_strict_refuses_plaintext_through_the_vip_from_another_node(lab: ServiceLab, strict_shop: PodInfo) -> None:
    """app-2-1 (not enrolled, node-2) -> shop/web's VIP: node-2's kube-proxy sends it to app-1-2 on node-1, whose
    agent captures it at the uplink as app-1-2's inbound and refuses the plaintext."""
    vip = lab.vip("shop/web")
    assert http_outcome(lab.pod("app-2-1"), (strict_shop.ip, h.SERVER_PORT)) in ("reset", "eof")
    assert http_outcome(lab.pod("app-2-1"), (vip, 80)) in ("reset", "eof")


def test_strict_refuses_plaintext_through_the_vip_from_the_same_node(lab: ServiceLab, strict_shop: PodInfo) -> None:
    """app-1-1 (not enrolled, node-1) -> shop/web's VIP: node-1's kube-proxy DNATs it to app-1-2 on the same node;
    app-1-2's door (the program on its veth toward the pod) captures it as inbound, and STRICT refuses it."""
    vip = lab.vip("shop/web")
    assert http_outcome(lab.pod(CLIENT), (strict_shop.ip, h.SERVER_PORT)) in ("reset", "eof")  # by its IP: refused
    assert http_outcome(lab.pod(CLIENT), (vip, 80)) in ("reset", "eof")


# -- down --------------------------------------------------------------------------------------------------------------
def test_down_leaves_no_kube_proxy_table_and_no_hosts_file() -> None:
    name = f"lsvc-down-{secrets.token_hex(3)}"
    info = control.up(name, nodes=2, pods=2, agents=False)
    try:
        for node in info.nodes:
            assert f"table ip {TABLE}" in netns.run(node.netns, ["nft", "list", "tables"]).stdout
        files = [hosts.path(p.netns, name) for p in info.pods for name in hosts.FILES]
        assert all(f.read_text().startswith("# written by `ambit lab`") for f in files)
    finally:
        control.down(name, timeout=5)
    assert not [f for f in files if f.exists()] and not [f.parent for f in files if f.parent.exists()]
    assert not [n for n in netns.list_netns() if n.startswith(rt.netns_prefix(name))]  # the tables went with them
    assert not LabPaths.of(name).root.exists() and not h.lab_processes(name)
