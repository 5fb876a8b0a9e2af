"""What the proxies remember of the mesh state between connections: the outbound side's plans (source pod, its
identity, the route), made again after any change and never kept for a Service, whose endpoint is drawn for each
connection; the inbound side's guess of the Service of a connection that named none."""

from __future__ import annotations

from agent.ca.authority import CertificateAuthority
from agent.identity.manager import CertificateManager
from agent.mesh.store import MeshStore
from agent.proxy.context import Mesh
from agent.proxy.inbound import InboundProxy
from agent.proxy.outbound import OutboundProxy
from agent.proxy.route import Kind
from agent.telemetry.hub import Telemetry, TelemetryConfig
from hbone import Authority, InboundRequest, Pool, SpiffeId, TrustBundle
from tests.fixtures.mesh_objects import AMBIENT, namespace, pod, service

CLIENT, SERVER, OTHER_SERVER, VIP = "10.0.1.1", "10.0.2.1", "10.0.2.2", "10.96.0.9"


class _NoCa:
    async def create_certificate(self, csr_pem: bytes, identity: SpiffeId | None,
                                 validity: object = None) -> list[bytes]:
        raise AssertionError("no certificate is fetched here")

    def set_trust_bundle(self, bundle: TrustBundle) -> None:
        pass


def mesh_of(store: MeshStore, node: str) -> Mesh:
    bundle = CertificateAuthority.create("cluster.local").trust_bundle
    return Mesh(node, "cluster.local", store, CertificateManager(_NoCa(), bundle), Pool(lambda: bundle),
                frozenset(), Telemetry(node, store, "cluster.local", TelemetryConfig()))


def outbound(store: MeshStore) -> OutboundProxy:
    mesh = mesh_of(store, "node-a")
    return OutboundProxy(mesh, InboundProxy(mesh))


def mesh_objects(server_labels: dict[str, str]) -> list[dict[str, object]]:
    return [namespace("shop", AMBIENT), pod("client", "shop", CLIENT, node="node-a"),
            pod("web-1", "shop", SERVER, node="node-b", labels=server_labels),
            pod("web-2", "shop", OTHER_SERVER, node="node-b", labels={"app": "web"}),
            service("web", "shop", VIP, selector={"app": "web"})]


def test_a_plan_is_kept_while_the_state_is_the_same_and_made_again_after_a_change() -> None:
    store = MeshStore()
    assert store.apply(mesh_objects({"app": "web"})) == []
    proxy = outbound(store)
    first = proxy._plan((CLIENT, 40000), (SERVER, 8080))
    assert first is not None and first.route.kind is Kind.HBONE
    assert first.identity == SpiffeId("cluster.local", "shop", "sa")
    assert first.authority == Authority(SERVER, 8080)
    assert proxy._plan((CLIENT, 40001), (SERVER, 8080)) is first  # another port of the same pod: the same plan
    # the destination pod leaves the mesh: the next connection is passed through, not tunnelled
    assert store.apply([pod("web-1", "shop", SERVER, node="node-b",
                            labels={"app": "web", "istio.io/dataplane-mode": "none"})]) == []
    after = proxy._plan((CLIENT, 40002), (SERVER, 8080))
    assert after is not None and after.route.kind is Kind.PASSTHROUGH and after.authority is None
    # the source leaves the mesh: refused (no plan)
    assert store.apply([pod("client", "shop", CLIENT, node="node-a",
                            labels={"istio.io/dataplane-mode": "none"})]) == []
    assert proxy._plan((CLIENT, 40003), (SERVER, 8080)) is None


def test_a_service_endpoint_is_drawn_for_each_connection() -> None:
    store = MeshStore()
    assert store.apply(mesh_objects({"app": "web"})) == []
    proxy = outbound(store)
    drawn = set()
    for port in range(40000, 40064):
        plan = proxy._plan((CLIENT, port), (VIP, 80))
        assert plan is not None and plan.route.kind is Kind.HBONE and plan.route.service is not None
        drawn.add(plan.route.target[0])
    assert drawn == {SERVER, OTHER_SERVER}  # 64 draws of two: both, but for a 2**-63 chance
    # one endpoint leaves the mesh, the other is deleted: the next draws see the Service as it is now
    assert store.apply([pod("web-1", "shop", SERVER, node="node-b",
                            labels={"app": "web", "istio.io/dataplane-mode": "none"})],
                       deletes=[("Pod", "shop", "web-2")]) == []
    for port in range(40100, 40116):
        plan = proxy._plan((CLIENT, port), (VIP, 80))
        assert plan is not None and plan.route.kind is Kind.DIRECT and plan.route.target == (SERVER, 80)
        assert plan.authority is None


def connect_request(port: int, headers: dict[str, str]) -> InboundRequest:
    return InboundRequest(SpiffeId("cluster.local", "shop", "sa"), (CLIENT, 51000), (SERVER, 15008),
                          Authority(SERVER, port), headers)


def test_the_guessed_service_follows_the_state() -> None:
    store = MeshStore()
    objects = mesh_objects({"app": "web"})
    assert store.apply(objects[:-1]) == []  # no Service yet
    inbound = InboundProxy(mesh_of(store, "node-b"))
    request = connect_request(80, {"forwarded": f'for="{CLIENT}:40000"'})
    assert inbound._service(inbound._connection(request)) is None
    assert store.apply(objects[-1:]) == []  # the Service appears: port 80 of its pods
    assert inbound._service(inbound._connection(request)) == "web.shop.svc.cluster.local"
    assert inbound._service(inbound._connection(connect_request(8080, {}))) is None  # another port: none
    assert store.apply([], deletes=[("Service", "shop", "web")]) == []
    assert inbound._service(inbound._connection(request)) is None


def test_each_request_is_read_for_itself() -> None:
    store = MeshStore()
    assert store.apply(mesh_objects({"app": "web"})) == []
    inbound = InboundProxy(mesh_of(store, "node-b"))
    first = connect_request(80, {"forwarded": f'for="{CLIENT}:40000";host=web.shop.svc.cluster.local'})
    second = connect_request(80, {"forwarded": f'for="{CLIENT}:40001"'})
    assert inbound._connection(first) is inbound._connection(first)  # asked twice (policy, then connect)
    assert (inbound._connection(second).client, inbound._connection(second).service) == ((CLIENT, 40001), None)
    assert (inbound._connection(first).client, inbound._connection(first).service) == \
        ((CLIENT, 40000), "web.shop.svc.cluster.local")
