"""Every way into an enrolled pod goes through Ambit (issue 16): the attack suite.

The victim is app-1-2 (namespace ``mesh``, enrolled, node-1). The attackers try every path into it that a
cluster offers, each of which reaches the pod only through its veth's egress on node-1 (its door) or, for the
pod IP from another node, the uplink:

    pod-ip-other-node     app-2-1 -> app-1-2's IP            (the uplink; the one path captured before the door)
    pod-ip-same-node      app-1-1 -> app-1-2's IP            (the client's veth)
    vip-same-node         app-1-1 -> mesh/victim's VIP       (node-1's kube-proxy DNATs it: only the door sees it)
    vip-other-node        app-2-1 -> mesh/victim's VIP       (DNAT on node-2, then the uplink of node-1)
    nodeport-this-node    app-2-1 -> node-1:30080            (node-1 DNATs and masquerades: the door)
    nodeport-other-node   app-2-1 -> node-2:30080            (node-2 DNATs and masquerades, node-1's uplink)
    denied-via-nodeport   app-1-3 -> node-2:30080            (an enrolled pod a DENY names, laundering itself
                                                              through another node's NodePort)
    node-process          node-1's own namespace -> app-1-2  (a hostNetwork pod, kubelet: the door)
    overlay               a host behind another interface of node-1 (not the agent's --uplink: an overlay, a
                          VPN) -> app-1-2's IP               (the door)

With STRICT in ``mesh``, or an allow-nothing AuthorizationPolicy on app-1-2, every path is refused and
node-1's agent records a DROPPED flow naming STRICT or the policy; with PERMISSIVE and no policy every path
works, captured: node-1's agent records a flow of plaintext (a pod's address names the pod in the flow, as
Hubble does, but no identity was proved). Mesh clients keep working
throughout. From the node, the pod's probe port passes whatever the policy (kubelet), and any other port is
judged.

Lab: 2 nodes, 3 pods each; app-i-1 in ``plain`` (not enrolled), app-i-2 in ``mesh`` and app-i-3 in ``mesh2``
(both enrolled).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.lab import runtime as rt
from tests.fixtures import lab_helpers as h
from tests.fixtures import lab_observe as lo
from tests.fixtures import packets
from tests.fixtures.eventually import eventually_sync

pytestmark = lo.lab_marks()

MESH = "mesh"
MESH2 = "mesh2"
VICTIM = "app-1-2"
NODE_PORT = 30080
PROBE_PORT = 8081  # the victim's readiness probe (tcpSocket); its server listens on 8080 and 8081
OVERLAY_NET = ("172.31.250.1", "172.31.250.2")  # node-1 side, the outside host


class DoorLab(lo.RunningLab):
    tmp: Path
    overlay: lo.Place
    vip: str

    def apply(self, text: str) -> None:
        res = lo.lab_apply(self.name, self.tmp, text)
        assert res.returncode == 0, res.stderr

    def delete(self, *args: str) -> None:
        lo.ambit_ok("lab", "--name", self.name, "delete", *args)

    def at(self, pod: str) -> lo.Place:
        p = self.pod(pod)
        return lo.Place(p.key, p.netns, p.ip)

    def node(self, index: int) -> lo.Place:
        n = self.info.nodes[index]
        return lo.Place(n.name, n.netns, n.ip)

    def settle(self, policies: list[str]) -> None:
        lo.wait_agents(self.paths, self.nodes, policies=policies)


Path_ = lo.AttackPath[DoorLab]


def pod_ip(lab: DoorLab) -> tuple[str, int]:
    return lab.pod(VICTIM).ip, h.SERVER_PORT


PATHS = [
    Path_("pod-ip-other-node", lambda lab: lab.at("app-2-1"), pod_ip, lambda lab: lab.pod("app-2-1").ip),
    Path_("pod-ip-same-node", lambda lab: lab.at("app-1-1"), pod_ip, lambda lab: lab.pod("app-1-1").ip),
    Path_("vip-same-node", lambda lab: lab.at("app-1-1"), lambda lab: (lab.vip, 80),
          lambda lab: lab.pod("app-1-1").ip),
    Path_("vip-other-node", lambda lab: lab.at("app-2-1"), lambda lab: (lab.vip, 80),
          lambda lab: lab.pod("app-2-1").ip),
    Path_("nodeport-this-node", lambda lab: lab.at("app-2-1"), lambda lab: (lab.node(0).ip, NODE_PORT),
          lambda lab: lab.node(0).ip),
    Path_("nodeport-other-node", lambda lab: lab.at("app-2-1"), lambda lab: (lab.node(1).ip, NODE_PORT),
          lambda lab: lab.node(1).ip),
    Path_("denied-via-nodeport", lambda lab: lab.at("app-1-3"), lambda lab: (lab.node(1).ip, NODE_PORT),
          lambda lab: lab.node(1).ip),
    Path_("node-process", lambda lab: lab.node(0), pod_ip, lambda lab: lab.node(0).ip),
    Path_("overlay", lambda lab: lab.overlay, pod_ip, lambda lab: OVERLAY_NET[1]),
]
IDS = [p.name for p in PATHS]

SERVICES = f"""\
{{"apiVersion": "v1", "kind": "Service", "metadata": {{"name": "victim", "namespace": "{MESH}"}},
 "spec": {{"selector": {{"app": "{VICTIM}"}},
          "ports": [{{"name": "tcp", "port": 80, "targetPort": {h.SERVER_PORT}}}]}}}}
---
{{"apiVersion": "v1", "kind": "Service", "metadata": {{"name": "victim-np", "namespace": "{MESH}"}},
 "spec": {{"type": "NodePort", "selector": {{"app": "{VICTIM}"}},
          "ports": [{{"name": "tcp", "port": 80, "targetPort": {h.SERVER_PORT}, "nodePort": {NODE_PORT}}}]}}}}
"""

# The victim as the kubelet knows it: its server on 8080, a readiness probe on PROBE_PORT.
VICTIM_POD = f"""{{"apiVersion": "v1", "kind": "Pod", "metadata": {{"name": "{VICTIM}", "namespace": "{MESH}"}},
 "spec": {{"containers": [{{"name": "app", "ports": [{{"name": "http", "containerPort": {h.SERVER_PORT}}},
                                                   {{"name": "health", "containerPort": {PROBE_PORT}}}],
                          "readinessProbe": {{"tcpSocket": {{"port": "health"}}}}}}]}}}}
"""
STRICT = f"""{{"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
 "metadata": {{"name": "strict", "namespace": "{MESH}"}}, "spec": {{"mtls": {{"mode": "STRICT"}}}}}}
"""
ALLOW_NOTHING = f"""{{"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
 "metadata": {{"name": "allow-nothing", "namespace": "{MESH}"}},
 "spec": {{"selector": {{"matchLabels": {{"app": "{VICTIM}"}}}}}}}}
"""
DENY_APP_1_3 = f"""{{"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
 "metadata": {{"name": "deny-app-1-3", "namespace": "{MESH}"}},
 "spec": {{"selector": {{"matchLabels": {{"app": "{VICTIM}"}}}}, "action": "DENY",
          "rules": [{{"from": [{{"source": {{"principals": ["cluster.local/ns/{MESH2}/sa/app-1-3"]}}}}]}}]}}}}
"""




def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)


@contextlib.contextmanager
def overlay_host(lab_name: str, node_netns: str) -> Iterator[lo.Place]:
    """A host behind a second interface of node-1 (``ovl0``, not the agent's uplink), routed to the pods: what
    an overlay (vxlan, WireGuard) or another network delivers to the node. Named with the lab's prefix, so that
    ``lab down`` would take it too."""
    ns = f"{rt.netns_prefix(lab_name)}ovl"
    _ip("netns", "add", ns)
    try:
        _ip("link", "add", "ovl0", "netns", node_netns, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("-n", node_netns, "addr", "add", f"{OVERLAY_NET[0]}/30", "dev", "ovl0")
        _ip("-n", node_netns, "link", "set", "ovl0", "up")
        _ip("-n", ns, "addr", "add", f"{OVERLAY_NET[1]}/30", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "route", "add", "10.200.0.0/16", "via", OVERLAY_NET[0])
        yield lo.Place("overlay", ns, OVERLAY_NET[1])
    finally:
        subprocess.run(["ip", "-n", node_netns, "link", "del", "ovl0"], check=False, capture_output=True,
                       timeout=10)
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True, timeout=10)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DoorLab]:
    with h.running_lab("door", nodes=2, pods=3, namespaces=("plain", MESH, MESH2)) as (info, paths):
        lab = DoorLab(info, paths)
        lab.tmp = tmp_path_factory.mktemp("door")
        lab.apply(SERVICES + "---\n" + VICTIM_POD)
        status = json.loads(lo.ambit_ok("lab", "--name", lab.name, "status", "--json"))
        lab.vip = next(s["vips"][0] for s in status["services"] if s["name"] == "victim")
        for namespace in (MESH, MESH2):
            h.set_namespace_label(paths, namespace, "ambient")
        victim = lab.pod(VICTIM)
        servers = [h.EchoServer(victim, port).start() for port in (h.SERVER_PORT, PROBE_PORT)]
        servers += [h.EchoServer(lab.pod(p)).start() for p in ("app-2-2",)]
        try:
            with overlay_host(lab.name, info.nodes[0].netns) as lab.overlay:
                lo.wait_agents(paths, lab.nodes, policies=[], captured={
                    "node-1": {victim.ip, lab.pod("app-1-3").ip}, "node-2": {lab.pod("app-2-2").ip,
                                                                          lab.pod("app-2-3").ip}})
                yield lab
        finally:
            for server in servers:
                server.close()


def in_force(lab: DoorLab, text: str, kind: str, name: str) -> contextlib.AbstractContextManager[None]:
    return lo.policies_in_force(lab, lab.tmp, text, (kind, MESH, name))


def flows_to_victim(lab: DoorLab, since: str, verdict: str) -> list[dict[str, Any]]:
    found = lo.flows(lo.observe(lab.name, "--since", since, "--node-name", "node-1", "--to-pod", f"{MESH}/{VICTIM}",
                                "--verdict", verdict, "--all"))
    return [f for f in found if f.get("event_type") != "KERNEL"]


def run_path(lab: DoorLab, path: Path_) -> tuple[lo.Attempt, str]:
    """One connection along ``path``: what became of it, and a time just before it (for ``--since``)."""
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() - 1)) + "Z"
    return lo.attempt_at(path.source(lab), path.target(lab), size=256), since


def assert_recorded(lab: DoorLab, path: Path_, since: str, verdict: str, why: str) -> dict[str, Any]:
    """Node-1's agent recorded this path's connection to the victim with ``verdict`` (and ``why`` in the drop
    reason); returns the flow."""
    return lo.recorded_flow(lab.name, "node-1", f"{MESH}/{VICTIM}", since, path.seen_from(lab), verdict, why)


@pytest.mark.parametrize("path", PATHS, ids=IDS)
def test_strict_refuses_every_path(lab: DoorLab, path: Path_) -> None:
    with in_force(lab, STRICT, "PeerAuthentication", "strict"):
        a, since = run_path(lab, path)
        assert a.refused, f"{path.name}: {a}"
        flow = assert_recorded(lab, path, since, "DROPPED", "mTLS is STRICT")
        assert not flow["ip"].get("encrypted"), flow
        assert lo.attempt(lab.pod("app-2-2"), lab.pod(VICTIM)).outcome == "ok"  # the mesh still works


@pytest.mark.parametrize("path", PATHS, ids=IDS)
def test_allow_nothing_refuses_every_path(lab: DoorLab, path: Path_) -> None:
    with in_force(lab, ALLOW_NOTHING, "AuthorizationPolicy", "allow-nothing"):
        a, since = run_path(lab, path)
        assert a.refused, f"{path.name}: {a}"
        flow = assert_recorded(lab, path, since, "DROPPED", "")
        assert flow.get("policy", "") in ("", f"{MESH}/allow-nothing") and "ALLOW" in flow["drop_reason_desc"], flow


@pytest.mark.parametrize("path", PATHS, ids=IDS)
def test_permissive_serves_every_path_captured(lab: DoorLab, path: Path_) -> None:
    a, since = run_path(lab, path)
    assert a.outcome == "ok", f"{path.name}: {a}"
    flow = assert_recorded(lab, path, since, "FORWARDED", "")
    assert not flow["ip"].get("encrypted"), flow  # plaintext: whoever the source address names, nothing proved it


SERVICE_CALLED = {"vip-same-node": "victim", "nodeport-this-node": "victim-np", "vip-other-node": "victim"}


@pytest.mark.parametrize("path", [p for p in PATHS if p.name in SERVICE_CALLED], ids=lambda p: p.name)
def test_the_service_the_client_called_is_kept_where_this_node_translated_it(lab: DoorLab, path: Path_) -> None:
    """Policy sees the pod the DNAT chose, but the flow names the Service the client called: node-1's conntrack
    knows it for a VIP or a node port node-1 translated (the node port: victim-np, though victim, first by name,
    also serves the pod's port); for a VIP node-2 translated, node-1 falls back to the Service serving the
    pod's port (ztunnel's guess)."""
    a, since = run_path(lab, path)
    assert a.outcome == "ok", f"{path.name}: {a}"
    flow = assert_recorded(lab, path, since, "FORWARDED", "")
    assert flow["destination_service"] == {"name": SERVICE_CALLED[path.name], "namespace": MESH}, flow


def test_the_denied_pod_is_refused_by_name_where_its_identity_survives(lab: DoorLab) -> None:
    """The DENY of app-1-3's principal holds for its mesh path; through another node's NodePort its identity is
    lost (plaintext from node-2's address, as in Istio), so STRICT or allow-nothing is what stops it there."""
    with in_force(lab, DENY_APP_1_3, "AuthorizationPolicy", "deny-app-1-3"):
        assert lo.attempt(lab.pod("app-1-3"), lab.pod(VICTIM)).refused
        assert lo.attempt(lab.pod("app-2-2"), lab.pod(VICTIM)).outcome == "ok"


def test_from_the_node_the_probe_port_passes_and_any_other_is_judged(lab: DoorLab) -> None:
    """Kubelet probes need no policy: with allow-nothing and STRICT in force, the node reaches the victim's
    probe port directly (uncaptured: no flow), while its connection to 8080 is refused."""
    node, victim = lab.node(0), lab.pod(VICTIM)
    with in_force(lab, ALLOW_NOTHING, "AuthorizationPolicy", "allow-nothing"):
        since = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() - 1)) + "Z"
        probe = lo.attempt_at(node, (victim.ip, PROBE_PORT), size=64)
        assert probe.outcome == "ok", probe
        assert lo.attempt_at(node, (victim.ip, h.SERVER_PORT), size=64).refused
        time.sleep(0.5)
        seen = {lo.tcp(f).get("destination_port") for f in flows_to_victim(lab, since, "DROPPED")}
        seen |= {lo.tcp(f).get("destination_port") for f in flows_to_victim(lab, since, "FORWARDED")}
        assert PROBE_PORT not in seen and h.SERVER_PORT in seen, seen


def drops_counted(lab: DoorLab, reason: str) -> float:
    """node-1's hubble_drop_total for ``reason``."""
    _families, samples = lo.scrape(lab.paths, "node-1")
    return sum(s.value for s in samples if s.name == "hubble_drop_total" and s.labels.get("reason") == reason)


def dropped_flows(lab: DoorLab) -> list[dict[str, Any]]:
    return lo.flows(lo.observe(lab.name, "--verdict", "DROPPED", "--node-name", "node-1", "--all"))


def test_a_forged_enrolled_source_from_the_overlay_is_dropped_at_the_door(lab: DoorLab) -> None:
    """The door verifies sources too: a SYN from behind the overlay claiming app-1-3's address (an enrolled pod of
    node-1, whose own traffic comes in on its own veth) is dropped and counted, never captured as app-1-3."""
    before = drops_counted(lab, "SPOOFED")
    packets.send_syn(lab.overlay.netns, lab.pod("app-1-3").ip, lab.pod(VICTIM).ip, 40003, h.SERVER_PORT)
    eventually_sync(lambda: drops_counted(lab, "SPOOFED") >= before + 1, "a SPOOFED drop counted on node-1", 5)
    assert any("spoofed" in f.get("drop_reason_desc", "") and lo.tcp(f).get("source_port") == 40003
               for f in dropped_flows(lab))


def test_a_connection_fragmented_on_purpose_does_not_slip_past_the_door(lab: DoorLab) -> None:
    """Only a first fragment carries TCP ports, so fragments cannot be captured, and the pod's kernel reassembles
    whatever reaches it: a SYN sent as fragments from behind the overlay would open a plaintext connection to the
    victim past the agent. The door drops TCP fragments to an enrolled pod and counts them (the same fragments
    do reach a pod that is not enrolled: the watch sees them)."""
    src, plain = OVERLAY_NET[1], lab.pod("app-1-1")
    with packets.TcpWatch(plain.netns) as watch:
        packets.send(lab.overlay.netns, plain.ip, packets.fragmented_syn(src, plain.ip, 40004, h.SERVER_PORT))
        assert watch.seen(40004, within=5), "the fragmented SYN did not reach the pod that is not enrolled"

    victim = lab.pod(VICTIM)
    before = drops_counted(lab, "FRAGMENT")
    with packets.TcpWatch(victim.netns) as watch:
        packets.send(lab.overlay.netns, victim.ip, packets.fragmented_syn(src, victim.ip, 40005, h.SERVER_PORT))
        assert not watch.seen(40005, within=2), "the fragmented SYN reached the enrolled pod"
    # how many fragments reach the door depends on whether node-1 reassembled them (conntrack) and sent it anew
    # as fragments, whose sending stops at the first dropped one: at least one
    eventually_sync(lambda: drops_counted(lab, "FRAGMENT") >= before + 1, "the fragments counted on node-1", 15)
    assert any("fragment" in f.get("drop_reason_desc", "") and f["ip"]["source"] == src
               for f in dropped_flows(lab))


def test_an_enrolled_pod_cannot_send_fragments_past_its_capture(lab: DoorLab) -> None:
    """The other way: TCP the enrolled victim sends as fragments (a raw socket in the pod) would leave it
    uncaptured, in plaintext; its veth's program drops them, counted, and they never reach the other pod."""
    victim, plain = lab.pod(VICTIM), lab.pod("app-2-1")
    before = drops_counted(lab, "FRAGMENT")
    with packets.TcpWatch(plain.netns) as watch:
        packets.send(victim.netns, plain.ip, packets.fragmented_syn(victim.ip, plain.ip, 40006, h.SERVER_PORT))
        assert not watch.seen(40006, within=2), "the enrolled pod's fragments left the node"
    eventually_sync(lambda: drops_counted(lab, "FRAGMENT") >= before + 1, "the fragments counted on node-1", 15)
