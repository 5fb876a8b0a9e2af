"""The attack suite over IPv6 (issue 16): in a dual-stack lab, the paths into an enrolled pod that IPv6 offers
(the lab's Services are IPv4 only) are captured as for IPv4: refused by STRICT with a DROPPED flow naming it,
served in PERMISSIVE with a flow of plaintext; from the node, the pod's probe port passes.

Lab: 2 nodes, 2 pods each, dual stack; app-i-1 in ``plain`` (not enrolled), app-i-2 in ``mesh`` (enrolled). The
victim is app-1-2.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures import lab_helpers as h
from tests.fixtures import lab_observe as lo

pytestmark = lo.lab_marks()

MESH = "mesh"
VICTIM = "app-1-2"
PROBE_PORT = 8081
VICTIM_POD = f"""{{"apiVersion": "v1", "kind": "Pod", "metadata": {{"name": "{VICTIM}", "namespace": "{MESH}"}},
 "spec": {{"containers": [{{"name": "app", "ports": [{{"containerPort": {h.SERVER_PORT}}}],
                          "livenessProbe": {{"tcpSocket": {{"port": {PROBE_PORT}}}}}}}]}}}}
"""
STRICT = f"""{{"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
 "metadata": {{"name": "strict", "namespace": "{MESH}"}}, "spec": {{"mtls": {{"mode": "STRICT"}}}}}}
"""


class V6Lab(lo.RunningLab):
    tmp: Path


@dataclass(frozen=True)
class V6Path:
    name: str
    source: Callable[[V6Lab], lo.Place]  # at its IPv6 address


def pod_source(name: str) -> Callable[[V6Lab], lo.Place]:
    return lambda lab: lo.Place(lab.pod(name).key, lab.pod(name).netns, lab.pod(name).ip6)


PATHS = [
    V6Path("pod-ip-other-node", pod_source("app-2-1")),
    V6Path("pod-ip-same-node", pod_source("app-1-1")),
    V6Path("node-process", lambda lab: lo.Place("node-1", lab.info.nodes[0].netns, lab.info.nodes[0].ip6)),
]
IDS = [p.name for p in PATHS]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[V6Lab]:
    with h.running_lab("door6", nodes=2, pods=2, namespaces=("plain", MESH), dual_stack=True) as (info, paths):
        lab = V6Lab(info, paths)
        lab.tmp = tmp_path_factory.mktemp("door6")
        assert lo.lab_apply(lab.name, lab.tmp, VICTIM_POD).returncode == 0
        h.set_namespace_label(paths, MESH, "ambient")
        victim = lab.pod(VICTIM)
        servers = [h.EchoServer(victim, port, host="::").start() for port in (h.SERVER_PORT, PROBE_PORT)]
        try:
            lo.wait_agents(paths, lab.nodes, policies=[], captured={
                "node-1": set(victim.ips), "node-2": set(lab.pod("app-2-2").ips)})
            yield lab
        finally:
            for server in servers:
                server.close()


def since_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() - 1)) + "Z"


def recorded(lab: V6Lab, since: str, source: str, verdict: str, why: str) -> dict[str, Any]:
    return lo.recorded_flow(lab.name, "node-1", f"{MESH}/{VICTIM}", since, source, verdict, why)


@pytest.mark.parametrize("path", PATHS, ids=IDS)
def test_strict_refuses_every_ipv6_path(lab: V6Lab, path: V6Path) -> None:
    lab_apply = lo.lab_apply(lab.name, lab.tmp, STRICT)
    assert lab_apply.returncode == 0, lab_apply.stderr
    try:
        lo.wait_agents(lab.paths, lab.nodes, policies=[f"PeerAuthentication {MESH}/strict"])
        src, since = path.source(lab), since_now()
        a = lo.attempt_at(src, (lab.pod(VICTIM).ip6, h.SERVER_PORT), size=256)
        assert a.refused, f"{path.name}: {a}"
        flow = recorded(lab, since, src.ip, "DROPPED", "mTLS is STRICT")
        assert flow["ip"]["ipVersion"] == "IPv6", flow
    finally:
        lo.ambit_ok("lab", "--name", lab.name, "delete", "peerauthentication", "strict", "-n", MESH)
        lo.wait_agents(lab.paths, lab.nodes, policies=[])


@pytest.mark.parametrize("path", PATHS, ids=IDS)
def test_permissive_serves_every_ipv6_path_captured(lab: V6Lab, path: V6Path) -> None:
    src, since = path.source(lab), since_now()
    a = lo.attempt_at(src, (lab.pod(VICTIM).ip6, h.SERVER_PORT), size=256)
    assert a.outcome == "ok", f"{path.name}: {a}"
    flow = recorded(lab, since, src.ip, "FORWARDED", "")
    assert not flow["ip"].get("encrypted"), flow


def test_from_the_node_the_ipv6_probe_port_passes(lab: V6Lab) -> None:
    node = lab.info.nodes[0]
    since = since_now()
    probe = lo.attempt_at(lo.Place(node.name, node.netns, node.ip6), (lab.pod(VICTIM).ip6, PROBE_PORT), size=64)
    assert probe.outcome == "ok", probe
    time.sleep(0.5)
    flows = lo.flows(lo.observe(lab.name, "--since", since, "--node-name", "node-1", "--to-pod", f"{MESH}/{VICTIM}",
                                "--all"))
    assert not [f for f in flows if lo.tcp(f).get("destination_port") == PROBE_PORT], flows
