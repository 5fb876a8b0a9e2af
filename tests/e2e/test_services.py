"""Issue 10 end to end on a real lab: an enrolled client calls a Service VIP; the agent picks an endpoint and
tunnels to it; the wire shows only TLS to 15008; endpoints share the load; an endpoint that leaves the
selector gets nothing new; no endpoint -> reset at once and a DROPPED flow naming the Service; STRICT admits
the client through the VIP; metrics and flows carry the Service.

Layout: 2 nodes, 3 pods each, namespace ``mesh`` (enrolled) holds app-i-1 and app-i-3, ``plain`` app-i-2.
The client is app-1-1; the Service ``web`` (VIP 10.96.7.10:80 -> 8080) selects app=web, given to app-1-3
(same node as the client), app-2-1 and app-2-3 (the other node). Every pod runs an echo server on 8080.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.lab import state as lab_state
from agent.lab.runtime import PodInfo
from tests.fixtures import lab_helpers as h
from tests.fixtures import lab_observe as lo
from tests.fixtures.eventually import eventually_sync

pytestmark = lo.lab_marks()

MESH, PLAIN = "mesh", "plain"
VIP, PORT = "10.96.7.10", 80
SERVICE = "mesh/web"
HOSTNAME = "web.mesh.svc.cluster.local"
BACKENDS = ("app-1-3", "app-2-1", "app-2-3")
EFFECT_WITHIN = 5.0  # seconds for a state change to reach both agents


def service_object() -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": MESH},
            "spec": {"clusterIP": VIP, "selector": {"app": "web"},
                     "ports": [{"name": "http", "port": PORT, "targetPort": h.SERVER_PORT, "protocol": "TCP"}]}}


class ServiceLab(lo.RunningLab):
    servers: dict[str, h.EchoServer]

    def set_app(self, pods: tuple[str, ...], app: str | None) -> None:
        with lab_state.edit(self.paths.state) as st:
            for name in pods:
                p = self.pod(name)
                st.label("Pod", p.namespace, p.name, [("app", app)], overwrite=True)

    def wait_endpoints(self, pods: tuple[str, ...]) -> None:
        """Until every agent's store has exactly ``pods`` as the Service's endpoints."""
        want = sorted(self.pod(p).ip for p in pods)

        def settled() -> bool:
            for node in self.nodes:
                services = {f"{s['namespace']}/{s['name']}": s for s in lo.config_dump(self.paths, node)["services"]}
                got = sorted(e["ip"] for e in services.get(SERVICE, {}).get("endpoints", []))
                if got != want:
                    return False
            return True

        eventually_sync(settled, f"{SERVICE} endpoints {pods} on every agent", EFFECT_WITHIN, interval=0.05)

    def served_by(self, client: PodInfo, connections: int, payload: h.Payload | None = None) -> Counter[str]:
        """``connections`` byte-exact exchanges through the VIP; which backend pod served each."""
        payload = payload or h.Payload.make(8192)
        before = {name: len(server.peers) for name, server in self.servers.items()}
        for _ in range(connections):
            with h.Client(client, (VIP, PORT)) as c:
                echo = c.exchange(payload)
                assert echo.server_sha256 == payload.sha256 == echo.echoed_sha256
                assert echo.peer[0] == client.ip  # the backend sees the client pod, not the node
        return Counter({name: len(server.peers) - before[name] for name, server in self.servers.items()
                        if len(server.peers) > before[name]})


@pytest.fixture(scope="module")
def lab() -> Iterator[ServiceLab]:
    with h.running_lab("svc", nodes=2, pods=3, namespaces=(MESH, PLAIN)) as (info, paths):
        lab = ServiceLab(info, paths)
        lab.servers = {p.name: h.EchoServer(p).start() for p in info.pods}
        try:
            h.set_namespace_label(paths, MESH, "ambient")
            with lab_state.edit(paths.state) as st:
                st.put(service_object())
            lo.wait_agents(paths, lab.nodes, captured={
                "node-1": {lab.pod("app-1-1").ip, lab.pod("app-1-3").ip},
                "node-2": {lab.pod("app-2-1").ip, lab.pod("app-2-3").ip}})
            yield lab
        finally:
            for server in lab.servers.values():
                server.close()


@pytest.fixture
def web(lab: ServiceLab) -> ServiceLab:
    lab.set_app(BACKENDS, "web")
    lab.wait_endpoints(BACKENDS)
    return lab


def test_vip_is_tunnelled_and_load_is_shared(web: ServiceLab, tmp_path: Path) -> None:
    client = web.pod("app-1-1")
    capture = h.Capture(web.info.switch, f"n{web.info.node('node-1').index}", "tcp", tmp_path / "svc.pcap")
    payload = h.Payload.make(8192)
    with capture:
        served = web.served_by(client, 300, payload)
    assert not capture.contains(payload.marker), "no plaintext of the pod on the wire"
    assert set(served) == set(BACKENDS), served
    # each backend has p = 1/3 of 300 (mean 100, sd 8.2): under 60 is a > 4.8-sigma event
    assert min(served.values()) >= 60, served
    pkts = h.packets(capture.path)
    remote = [web.pod(p).ip for p in BACKENDS if web.pod(p).node == "node-2"]
    between = [p for ip in remote for p in h.between(pkts, client.ip, ip)]
    assert between, "the capture saw the tunnelled connections"
    assert all(h.HBONE_PORT in (p.sport, p.dport) for p in between), "only HBONE between client and backends"
    assert not any(PORT in (p.dport, p.sport) for p in pkts), "the VIP's port never appears on the wire"
    assert not any(VIP in (p.dst, p.src) for p in pkts), "the VIP never appears on the wire"


def test_an_endpoint_that_leaves_gets_no_new_connections(web: ServiceLab) -> None:
    client = web.pod("app-1-1")
    with h.Client(client, (VIP, PORT)) as kept:  # a connection to whoever, opened before the change
        kept.exchange(b"before")
        web.set_app(("app-2-3",), "old")
        web.wait_endpoints(("app-1-3", "app-2-1"))
        served = web.served_by(client, 60)
        assert "app-2-3" not in served and sum(served.values()) == 60, served
        assert kept.exchange(b"after").size == 5  # connections already open keep running


def test_no_endpoint_is_refused_at_once_with_a_dropped_flow(web: ServiceLab) -> None:
    client = web.pod("app-1-1")
    web.set_app(BACKENDS, None)
    web.wait_endpoints(())
    started = time.monotonic()
    outcome = "ok"
    try:
        with h.Client(client, (VIP, PORT)) as c:
            c.exchange(b"x")
    except (ConnectionResetError, BrokenPipeError):
        outcome = "reset"
    except ConnectionError as e:
        outcome = f"closed: {e}"
    took = time.monotonic() - started
    assert outcome == "reset" and took < 2.0, (outcome, took)
    drops = lo.flows(lo.observe(web.name, "--verdict", "DROPPED", "--from-pod", f"{MESH}/app-1-1", "--all"))
    reasons = [f.get("drop_reason_desc", "") for f in drops]
    assert f"no healthy upstream: {SERVICE}:{PORT}" in reasons, reasons
    drop = next(f for f in drops if f.get("drop_reason_desc") == f"no healthy upstream: {SERVICE}:{PORT}")
    assert drop["destination_service"] == {"name": "web", "namespace": MESH}
    _families, samples = lo.scrape(web.paths, "node-1")
    failed = [s for s in samples if s.name == "istio_tcp_connections_closed_total"
              and s.labels.get("destination_service") == HOSTNAME and s.labels.get("response_flags") == "UH"]
    assert failed and failed[0].value >= 1, "a failed connection counted for the Service"


def test_strict_destination_admits_the_enrolled_client_via_the_vip(web: ServiceLab) -> None:
    client = web.pod("app-1-1")
    strict = {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
              "metadata": {"name": "strict", "namespace": MESH}, "spec": {"mtls": {"mode": "STRICT"}}}
    with lab_state.edit(web.paths.state) as st:
        st.put(strict)
    try:
        lo.wait_agents(web.paths, web.nodes, policies=["PeerAuthentication mesh/strict"])
        served = web.served_by(client, 30)
        assert sum(served.values()) == 30, served
        responses = lo.observe(web.name, "--to-service", SERVICE, "--type", "start", "--all")
        starts = [f for f in lo.flows(responses) if f.get("reporter") == "DESTINATION"]
        assert starts and all(f["destination_service"]["name"] == "web" for f in starts)
        assert all(f["ip"]["encrypted"] for f in starts if f["node_name"] == "node-2")
        _families, samples = lo.scrape(web.paths, "node-2")
        opened = [s for s in samples if s.name == "istio_tcp_connections_opened_total"
                  and s.labels.get("reporter") == "destination"
                  and s.labels.get("destination_service") == HOSTNAME
                  and s.labels.get("destination_service_name") == "web"
                  and s.labels.get("destination_service_namespace") == MESH]
        assert opened, "destination metrics carry the Service labels"
    finally:
        with lab_state.edit(web.paths.state) as st:
            st.remove("PeerAuthentication", MESH, "strict")


def test_a_pod_reaches_itself_through_its_own_service(web: ServiceLab) -> None:
    """Hairpin: app-1-3, the Service's only endpoint, calls the VIP. The agent reaches the pod from the node's
    address (as kube-proxy masquerades hairpin connections): from its own, the pod would answer itself over its
    loopback and the connection would hang."""
    web.set_app(("app-2-1", "app-2-3"), None)
    web.wait_endpoints(("app-1-3",))
    client = web.pod("app-1-3")
    payload = h.Payload.make(4096)
    with h.Client(client, (VIP, PORT)) as c:
        echo = c.exchange(payload)
    assert echo.server_sha256 == payload.sha256 == echo.echoed_sha256
    assert echo.peer[0] == web.info.node("node-1").ip, echo.peer
