"""The mesh and the attack suite over IPv6 (issue 16), in a dual-stack lab whose victim Services are dual-stack.

The mesh: app-2-2 (enrolled, node-2) reaches the victim app-1-2 (enrolled, node-1) at its IPv6 address through an
HBONE tunnel to ``[v6]:15008`` (only TLS on node-1's uplink), byte-exact, and both agents record the flow with
the IPv6 addresses and both SPIFFE identities; STRICT with an allow-nothing policy refuses it with a DROPPED flow
naming the policy. Through the victim Service's IPv6 VIP, the source agent picks the victim's IPv6 address
and the flows name the Service; a dual-stack Service with an IPv4 endpoint only refuses its IPv6 VIP (never an
IPv4 endpoint for an IPv6 client).

The attack suite (tests/e2e/test_door.py) over IPv6, the paths of that table an IPv6 address offers:

    pod-ip-other-node     app-2-1 -> app-1-2's IPv6 address
    pod-ip-same-node      app-1-1 -> app-1-2's IPv6 address
    vip-same-node         app-1-1 -> mesh/victim's IPv6 VIP    (node-1's kube-proxy DNATs it: the door)
    vip-other-node        app-2-1 -> mesh/victim's IPv6 VIP    (DNAT on node-2, then node-1's uplink)
    nodeport-this-node    app-2-1 -> [node-1's IPv6]:30080     (node-1 DNATs and masquerades: the door)
    nodeport-other-node   app-2-1 -> [node-2's IPv6]:30080     (node-2 DNATs and masquerades: node-1's uplink)
    enrolled-via-nodeport app-2-2 -> [node-1's IPv6]:30080     (an enrolled pod through a node port: its agent
                                                                passes it through, node-1 masquerades; the
                                                                identity is lost, plaintext from node-1)
    node-process          node-1's own namespace -> app-1-2's IPv6 address

With STRICT, or allow-nothing on the victim, each is refused and node-1's agent records a DROPPED flow (IPv6)
naming STRICT or the policy; with PERMISSIVE and no policy each works, captured: a flow of plaintext. From the
node, the victim's IPv6 probe port passes uncaptured.

Lab: 2 nodes, 2 pods each, dual stack; app-i-1 in ``plain`` (not enrolled), app-i-2 in ``mesh`` (enrolled).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_door import ALLOW_NOTHING, MESH, NODE_PORT, PROBE_PORT, STRICT, VICTIM, VICTIM_POD
from tests.fixtures import lab_helpers as h
from tests.fixtures import lab_observe as lo
from tests.fixtures.eventually import eventually_sync

pytestmark = lo.lab_marks()

CLIENT = "app-2-2"  # enrolled, on node-2
VIP_PORT = 80
NO_ALLOW_MATCHED = f"no ALLOW policy matched ({MESH}/allow-nothing)"  # the drop reason naming the policy
SERVICES = f"""\
{{"apiVersion": "v1", "kind": "Service", "metadata": {{"name": "victim", "namespace": "{MESH}"}},
 "spec": {{"ipFamilyPolicy": "RequireDualStack", "selector": {{"app": "{VICTIM}"}},
          "ports": [{{"name": "tcp", "port": {VIP_PORT}, "targetPort": {h.SERVER_PORT}}}]}}}}
---
{{"apiVersion": "v1", "kind": "Service", "metadata": {{"name": "victim-np", "namespace": "{MESH}"}},
 "spec": {{"type": "NodePort", "ipFamilyPolicy": "RequireDualStack", "selector": {{"app": "{VICTIM}"}},
          "ports": [{{"name": "tcp", "port": 80, "targetPort": {h.SERVER_PORT}, "nodePort": {NODE_PORT}}}]}}}}
"""


def v4_only_service(victim_ip: str) -> str:
    """A dual-stack Service whose only endpoint (an EndpointSlice of its own) is the victim's IPv4 address."""
    return f"""\
{{"apiVersion": "v1", "kind": "Service", "metadata": {{"name": "v4only", "namespace": "{MESH}"}},
 "spec": {{"ipFamilyPolicy": "RequireDualStack", "ports": [{{"name": "tcp", "port": {VIP_PORT}}}]}}}}
---
{{"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
 "metadata": {{"name": "v4only-1", "namespace": "{MESH}", "labels": {{"kubernetes.io/service-name": "v4only"}}}},
 "ports": [{{"name": "tcp", "port": {h.SERVER_PORT}, "protocol": "TCP"}}],
 "endpoints": [{{"addresses": ["{victim_ip}"], "nodeName": "node-1"}}]}}
"""


class V6Lab(lo.RunningLab):
    tmp: Path
    vip6: str
    v4only: list[str]  # the VIPs of the Service with an IPv4 endpoint only
    server: h.EchoServer  # the victim's, on 8080

    def at(self, pod: str) -> lo.Place:
        p = self.pod(pod)
        return lo.Place(p.key, p.netns, p.ip6)

    def node6(self, index: int) -> lo.Place:
        n = self.info.nodes[index]
        return lo.Place(n.name, n.netns, n.ip6)


Path_ = lo.AttackPath[V6Lab]


def pod_ip6(lab: V6Lab) -> tuple[str, int]:
    return lab.pod(VICTIM).ip6, h.SERVER_PORT


PATHS = [
    Path_("pod-ip-other-node", lambda lab: lab.at("app-2-1"), pod_ip6, lambda lab: lab.pod("app-2-1").ip6),
    Path_("pod-ip-same-node", lambda lab: lab.at("app-1-1"), pod_ip6, lambda lab: lab.pod("app-1-1").ip6),
    Path_("vip-same-node", lambda lab: lab.at("app-1-1"), lambda lab: (lab.vip6, VIP_PORT),
          lambda lab: lab.pod("app-1-1").ip6),
    Path_("vip-other-node", lambda lab: lab.at("app-2-1"), lambda lab: (lab.vip6, VIP_PORT),
          lambda lab: lab.pod("app-2-1").ip6),
    Path_("nodeport-this-node", lambda lab: lab.at("app-2-1"), lambda lab: (lab.node6(0).ip, NODE_PORT),
          lambda lab: lab.node6(0).ip),
    Path_("nodeport-other-node", lambda lab: lab.at("app-2-1"), lambda lab: (lab.node6(1).ip, NODE_PORT),
          lambda lab: lab.node6(1).ip),
    Path_("enrolled-via-nodeport", lambda lab: lab.at(CLIENT), lambda lab: (lab.node6(0).ip, NODE_PORT),
          lambda lab: lab.node6(0).ip),
    Path_("node-process", lambda lab: lab.node6(0), pod_ip6, lambda lab: lab.node6(0).ip),
]
IDS = [p.name for p in PATHS]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[V6Lab]:
    with h.running_lab("door6", nodes=2, pods=2, namespaces=("plain", MESH), dual_stack=True) as (info, paths):
        lab = V6Lab(info, paths)
        lab.tmp = tmp_path_factory.mktemp("door6")
        objects = [SERVICES, v4_only_service(lab.pod(VICTIM).ip), VICTIM_POD]
        applied = lo.lab_apply(lab.name, lab.tmp, "---\n".join(objects))
        assert applied.returncode == 0, applied.stderr
        status = json.loads(lo.ambit_ok("lab", "--name", lab.name, "status", "--json"))
        vips = {s["name"]: s["vips"] for s in status["services"]}
        assert all(len(vips[s]) == 2 and ":" in vips[s][1] for s in vips), vips  # IPv4 first, then IPv6
        lab.vip6, lab.v4only = vips["victim"][1], vips["v4only"]
        h.set_namespace_label(paths, MESH, "ambient")
        victim = lab.pod(VICTIM)
        servers = [h.EchoServer(victim, port, host="::").start() for port in (h.SERVER_PORT, PROBE_PORT)]
        lab.server = servers[0]
        try:
            lo.wait_agents(paths, lab.nodes, policies=[], captured={
                "node-1": set(victim.ips), "node-2": set(lab.pod(CLIENT).ips)})
            yield lab
        finally:
            for server in servers:
                server.close()


def since_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() - 1)) + "Z"


def recorded(lab: V6Lab, since: str, source: str, verdict: str, why: str = "", node: str = "node-1",
             ) -> dict[str, Any]:
    return lo.recorded_flow(lab.name, node, f"{MESH}/{VICTIM}", since, source, verdict, why)


def in_force(lab: V6Lab, text: str, *policies: tuple[str, str]) -> contextlib.AbstractContextManager[None]:
    return lo.policies_in_force(lab, lab.tmp, text, *((kind, MESH, name) for kind, name in policies))


def run_path(lab: V6Lab, path: Path_) -> tuple[lo.Attempt, str]:
    since = since_now()
    return lo.attempt_at(path.source(lab), path.target(lab), size=256), since


# -- the mesh over IPv6 ----------------------------------------------------------------------------------------------
def test_mesh_over_ipv6_is_an_hbone_tunnel_to_the_peer_nodes_15008(lab: V6Lab, tmp_path: Path) -> None:
    client, victim = lab.pod(CLIENT), lab.pod(VICTIM)
    payload = h.Payload.make(256 * 1024)
    since = since_now()
    capture = h.Capture(lab.info.switch, f"n{lab.info.node('node-1').index}", "tcp", tmp_path / "mesh6.pcap")
    with capture, h.Client(client, (victim.ip6, h.SERVER_PORT)) as c:
        echo = c.exchange(payload)
        local = c.local
    assert echo.server_sha256 == echo.echoed_sha256 == payload.sha256, "byte-exact both ways"
    assert echo.peer[0] == client.ip6, "the victim sees the client's own IPv6 address"
    assert not capture.contains(payload.marker), "no plaintext of the pods on the uplink"
    pkts = h.packets(capture.path)
    tunnel = h.between(pkts, client.ip6, victim.ip6)
    assert tunnel and all(h.HBONE_PORT in (p.sport, p.dport) for p in tunnel), \
        f"only HBONE between the pods' IPv6 addresses: {tunnel[:5]}"
    assert any(p.syn and p.dport == h.HBONE_PORT for p in tunnel), "a new connection to [v6]:15008"
    assert any(23 in p.tls_types for p in tunnel), "TLS application data in the tunnel"
    assert not any(h.SERVER_PORT in (p.sport, p.dport) for p in pkts), "the pods' port never on the wire"
    for node, reporter in (("node-1", "DESTINATION"), ("node-2", "SOURCE")):
        flow = recorded(lab, since, client.ip6, "FORWARDED", node=node)
        assert flow["reporter"] == reporter, flow
        assert flow["ip"] == {"source": client.ip6, "destination": victim.ip6, "ipVersion": "IPv6",
                              "encrypted": True}, flow
        assert lo.tcp(flow)["source_port"] == local[1] and lo.tcp(flow)["destination_port"] == h.SERVER_PORT
        assert flow["source"]["identity"] == lo.identity(client), flow
        assert flow["destination"]["identity"] == lo.identity(victim), flow


def test_strict_with_allow_nothing_refuses_the_mesh_client_over_ipv6_naming_the_policy(lab: V6Lab) -> None:
    client, victim = lab.pod(CLIENT), lab.pod(VICTIM)
    with in_force(lab, STRICT + "---\n" + ALLOW_NOTHING, ("PeerAuthentication", "strict"),
                  ("AuthorizationPolicy", "allow-nothing")):
        since = since_now()
        a = lo.attempt_at(lab.at(CLIENT), (victim.ip6, h.SERVER_PORT), size=256)
        assert a.refused, a
        flow = recorded(lab, since, client.ip6, "DROPPED")
        assert flow["drop_reason_desc"] == NO_ALLOW_MATCHED, flow
        assert flow["ip"]["ipVersion"] == "IPv6" and flow["ip"]["encrypted"], flow
        assert flow["source"]["identity"] == lo.identity(client), flow
    assert lo.attempt_at(lab.at(CLIENT), (victim.ip6, h.SERVER_PORT), size=256).outcome == "ok"  # PERMISSIVE


def test_the_ipv6_vip_goes_to_an_ipv6_endpoint_and_the_flows_name_the_service(lab: V6Lab) -> None:
    """The source agent resolves the VIP itself: the Service's endpoints are the victim's two addresses, and an
    IPv6 client gets the IPv6 one every time (the victim sees the client's IPv6 address)."""
    client, victim = lab.pod(CLIENT), lab.pod(VICTIM)
    payload = h.Payload.make(4096)
    since = since_now()
    before = len(lab.server.peers)
    for _ in range(10):
        with h.Client(client, (lab.vip6, VIP_PORT)) as c:
            echo = c.exchange(payload)
        assert echo.server_sha256 == echo.echoed_sha256 == payload.sha256
        assert echo.peer[0] == client.ip6, echo
    assert [ip for ip, _port in lab.server.peers[before:]] == [client.ip6] * 10
    for node in ("node-1", "node-2"):
        flow = recorded(lab, since, client.ip6, "FORWARDED", node=node)
        assert flow["ip"]["destination"] == victim.ip6 and flow["ip"]["encrypted"], flow
        assert flow["destination_service"] == {"name": "victim", "namespace": MESH}, flow


def test_an_ipv6_client_never_gets_an_ipv4_endpoint(lab: V6Lab) -> None:
    """A dual-stack Service whose only endpoint is IPv4: its IPv4 VIP works, its IPv6 VIP is refused at once by
    the source agent (no IPv6 endpoint), with a DROPPED flow naming the Service."""
    client = lab.pod(CLIENT)
    since = since_now()
    assert lo.attempt_at(lab.at(CLIENT), (lab.v4only[0], VIP_PORT), size=256).outcome == "ok"
    a = lo.attempt_at(lab.at(CLIENT), (lab.v4only[1], VIP_PORT), size=256)
    assert a.refused, a
    why = f"no healthy upstream: {MESH}/v4only:{VIP_PORT} (no IPv6 endpoint)"
    drops: list[dict[str, Any]] = []

    def dropped() -> bool:
        drops[:] = [f for f in lo.flows(lo.observe(lab.name, "--since", since, "--verdict", "DROPPED", "--from-pod",
                                                   f"{MESH}/{CLIENT}", "--all"))
                    if f.get("drop_reason_desc") == why]
        return bool(drops)

    eventually_sync(dropped, f"a DROPPED flow {why!r}", 5)
    assert drops[0]["node_name"] == "node-2" and drops[0]["ip"]["source"] == client.ip6, drops
    assert drops[0]["destination_service"] == {"name": "v4only", "namespace": MESH}, drops


def test_an_ipv6_ip_block_decides_for_plaintext_and_hbone_clients_alike(lab: V6Lab) -> None:
    """ALLOW from node-2's IPv6 pod range only: app-2-1 (plaintext) and app-2-2 (HBONE: its own address, carried
    in the tunnel) pass; app-1-1 is refused with a DROPPED flow naming the policy."""
    pod_range = lab.info.node("node-2").pod_cidr6
    allow = f"""{{"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
 "metadata": {{"name": "from-node-2", "namespace": "{MESH}"}},
 "spec": {{"selector": {{"matchLabels": {{"app": "{VICTIM}"}}}}, "action": "ALLOW",
          "rules": [{{"from": [{{"source": {{"ipBlocks": ["{pod_range}"]}}}}]}}]}}}}
"""
    victim = (lab.pod(VICTIM).ip6, h.SERVER_PORT)
    with in_force(lab, allow, ("AuthorizationPolicy", "from-node-2")):
        assert lo.attempt_at(lab.at("app-2-1"), victim, size=256).outcome == "ok"
        assert lo.attempt_at(lab.at(CLIENT), victim, size=256).outcome == "ok"
        since = since_now()
        a = lo.attempt_at(lab.at("app-1-1"), victim, size=256)
        assert a.refused, a
        flow = recorded(lab, since, lab.pod("app-1-1").ip6, "DROPPED")
        assert flow["drop_reason_desc"] == f"no ALLOW policy matched ({MESH}/from-node-2)", flow


# -- the attack suite over IPv6 --------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", PATHS, ids=IDS)
def test_strict_refuses_every_ipv6_path(lab: V6Lab, path: Path_) -> None:
    with in_force(lab, STRICT, ("PeerAuthentication", "strict")):
        a, since = run_path(lab, path)
        assert a.refused, f"{path.name}: {a}"
        flow = recorded(lab, since, path.seen_from(lab), "DROPPED", "mTLS is STRICT")
        assert flow["ip"]["ipVersion"] == "IPv6" and not flow["ip"].get("encrypted"), flow


@pytest.mark.parametrize("path", PATHS, ids=IDS)
def test_allow_nothing_refuses_every_ipv6_path(lab: V6Lab, path: Path_) -> None:
    with in_force(lab, ALLOW_NOTHING, ("AuthorizationPolicy", "allow-nothing")):
        a, since = run_path(lab, path)
        assert a.refused, f"{path.name}: {a}"
        flow = recorded(lab, since, path.seen_from(lab), "DROPPED")
        assert flow["drop_reason_desc"] == NO_ALLOW_MATCHED, flow
        assert flow["ip"]["ipVersion"] == "IPv6", flow


@pytest.mark.parametrize("path", PATHS, ids=IDS)
def test_permissive_serves_every_ipv6_path_captured(lab: V6Lab, path: Path_) -> None:
    a, since = run_path(lab, path)
    assert a.outcome == "ok", f"{path.name}: {a}"
    flow = recorded(lab, since, path.seen_from(lab), "FORWARDED")
    assert flow["ip"]["ipVersion"] == "IPv6" and not flow["ip"].get("encrypted"), flow  # plaintext: nothing proved
    assert flow["ip"]["destination"] == lab.pod(VICTIM).ip6, flow  # after any DNAT
    # a pod's address names the pod in the flow (as Hubble names endpoints by address); a node's names nobody
    named = next((p.key for p in lab.info.pods if p.ip6 == path.seen_from(lab)), "")
    assert "/".join(filter(None, (flow["source"].get("namespace"), flow["source"].get("pod_name")))) == named, flow
    if not named:
        assert not flow["source"].get("identity"), flow


def test_from_the_node_the_ipv6_probe_port_passes(lab: V6Lab) -> None:
    node = lab.node6(0)
    since = since_now()
    probe = lo.attempt_at(node, (lab.pod(VICTIM).ip6, PROBE_PORT), size=64)
    assert probe.outcome == "ok", probe
    time.sleep(0.5)
    flows = lo.flows(lo.observe(lab.name, "--since", since, "--node-name", "node-1", "--to-pod", f"{MESH}/{VICTIM}",
                                "--all"))
    assert not [f for f in flows if lo.tcp(f).get("destination_port") == PROBE_PORT], flows
