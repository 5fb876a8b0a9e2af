"""KubeSource: the API-server fake -> real client (agent/kube/client.py) -> informers -> the agent's MeshStore."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from agent.kube import AUTHORIZATION_POLICIES, PODS, KubeConfigError, KubeSource
from agent.mesh.store import Change, MeshState, MeshStore
from agent.retry import Backoff
from tests.fixtures.eventually import eventually
from tests.fixtures.kube_fake import (
    FakeApiServer,
    authorization_policy,
    namespace,
    peer_authentication,
    pod,
    service,
)

FAST = Backoff(initial=0.02, cap=0.2)
AMBIENT = {"istio.io/dataplane-mode": "ambient"}


@pytest.fixture
async def server() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer() as s:
        yield s


@asynccontextmanager
async def running(source: KubeSource, *, sync: bool = True) -> AsyncIterator[KubeSource]:
    task = asyncio.create_task(source.run())
    try:
        if sync:
            await asyncio.wait_for(source.synced.wait(), 3)
        yield source
    finally:
        await source.close()
        await asyncio.wait_for(task, 2)  # close() makes run() return


async def make_source(server: FakeApiServer, tmp_path: Path, store: MeshStore, **options: Any) -> KubeSource:
    options = {"backoff": FAST, "debounce": 0.02, **options}
    return await KubeSource.from_config(server.write_kubeconfig(tmp_path / "kubeconfig"), store, **options)


def workloads(state: MeshState) -> dict[str, tuple[str, bool]]:
    """IP -> (namespace/name, enrolled)."""
    return {ip: (w.key, w.enrolled) for ip, w in state.workloads.items()}


def kinds(state: MeshState) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for obj in state.objects:
        out.setdefault(obj["kind"], set()).add(obj["metadata"]["name"])
    return out


async def all_watching(server: FakeApiServer, count: int = 7) -> None:
    await eventually(lambda: server.watchers() == count, f"{count} watches")


def populate(server: FakeApiServer) -> None:
    server.create(namespace("mesh", AMBIENT))
    server.create(namespace("plain"))
    server.create(pod("a", "mesh", ip="10.0.0.1", service_account="sa-a"))
    server.create(pod("opt-out", "mesh", ip="10.0.0.2", labels={"istio.io/dataplane-mode": "none"}))
    server.create(pod("b", "plain", ip="10.0.1.1", node="node-b"))
    server.create(pod("c", "plain", ip="10.0.1.2", labels=AMBIENT))
    server.create(pod("pending", "mesh", phase="Pending"))
    server.create(service("web", "mesh", selector={"app": "web"}))
    server.create({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
                   "metadata": {"name": "web-x1", "namespace": "mesh", "labels": {"kubernetes.io/service-name": "web"}},
                   "endpoints": [{"addresses": ["10.0.0.1"]}], "ports": [{"port": 80}]})
    server.create(authorization_policy("allow-a", "mesh", {"action": "ALLOW", "rules": [{}]}))
    server.create(peer_authentication("strict", "mesh"))


async def test_initial_list_fills_the_store_with_enrollment(server: FakeApiServer, tmp_path: Path) -> None:
    populate(server)
    store = MeshStore()
    async with running(await make_source(server, tmp_path, store)) as source:
        state = store.state
        assert state.namespaces == {"mesh": AMBIENT, "plain": {}}
        assert workloads(state) == {
            "10.0.0.1": ("mesh/a", True), "10.0.0.2": ("mesh/opt-out", False),
            "10.0.1.1": ("plain/b", False), "10.0.1.2": ("plain/c", True)}
        assert state.workloads["10.0.0.1"].service_account == "sa-a"
        assert kinds(state) == {"AuthorizationPolicy": {"allow-a"}, "PeerAuthentication": {"strict"}}
        web = state.services["mesh/web"]  # selected pods are its endpoints; the slice serves selector-less ones
        assert (web.vips, [p.port for p in web.ports]) == (("10.96.0.10",), [80])
        assert dict(state.endpoints["mesh/web"]) == {}  # no pod is labelled app=web
        policy = next(o for o in state.objects if o["kind"] == "AuthorizationPolicy")
        assert policy["apiVersion"] == "security.istio.io/v1" and policy["spec"]["action"] == "ALLOW"
        assert source.updates == 1  # one store update for the whole initial list


async def test_watch_events_reach_the_store_promptly(server: FakeApiServer, tmp_path: Path) -> None:
    populate(server)
    store = MeshStore()
    changes: list[Change] = []
    store.subscribe(lambda _state, change: changes.append(change))
    async with running(await make_source(server, tmp_path, store)):
        await all_watching(server)
        server.create(pod("new", "mesh", ip="10.0.0.3"))
        await eventually(lambda: "10.0.0.3" in store.state.workloads, "the new pod", within=1)
        assert store.state.workloads["10.0.0.3"].enrolled
        server.update(namespace("plain", AMBIENT))  # enrolling a namespace needs no pod change
        await eventually(lambda: store.state.workloads["10.0.1.1"].enrolled, "plain/b enrolled", within=1)
        server.delete("Pod", "a", "mesh")
        server.update(pod("pending", "mesh", ip="10.0.0.4"))  # scheduled and running now
        await eventually(lambda: "10.0.0.1" not in store.state.workloads and "10.0.0.4" in store.state.workloads,
                         "the deletion and the started pod", within=1)
        server.delete("AuthorizationPolicy", "allow-a", "mesh")
        await eventually(lambda: "AuthorizationPolicy" not in kinds(store.state), "the policy deleted", within=1)
    assert changes and all(changes)  # subscribers hear only of real changes


async def test_gone_relist_converges_including_deletions_in_the_gap(server: FakeApiServer, tmp_path: Path) -> None:
    populate(server)
    store = MeshStore()
    async with running(await make_source(server, tmp_path, store)) as source:
        await all_watching(server)
        server.drop_watches()  # nothing awaits until compact(): the client can only learn of this by relisting
        server.delete("Pod", "a", "mesh")
        server.delete("Namespace", "plain")
        server.delete("PeerAuthentication", "strict", "mesh")
        server.create(pod("d", "mesh", ip="10.0.0.9"))
        server.compact()
        await eventually(lambda: set(store.state.workloads) == {"10.0.0.2", "10.0.1.1", "10.0.1.2", "10.0.0.9"}
                         and "plain" not in store.state.namespaces and "PeerAuthentication" not in kinds(store.state),
                         "convergence after 410 Gone")
        assert store.state.workloads["10.0.1.2"].enrolled  # its own label, namespace gone or not
        assert all(i.relists_gone == 1 and i.lists == 2 for i in source.informers.values())


async def test_api_server_outage_reconnects_and_converges(server: FakeApiServer, tmp_path: Path) -> None:
    populate(server)
    store = MeshStore()
    async with running(await make_source(server, tmp_path, store)) as source:
        await all_watching(server)
        for kind in server.resources:
            server.fail(kind, 503, times=3)
        server.drop_watches()
        server.delete("Pod", "b", "plain")
        server.update(namespace("mesh"))  # un-enrolls mesh's pods
        await eventually(lambda: workloads(store.state) == {
            "10.0.0.1": ("mesh/a", False), "10.0.0.2": ("mesh/opt-out", False), "10.0.1.2": ("plain/c", True)},
            "convergence after the outage")
        await all_watching(server)
        assert all(i.lists == 1 and i.failures == 0 for i in source.informers.values() if i.resource == PODS)


async def test_resync_replays_the_cache_without_listing(server: FakeApiServer, tmp_path: Path) -> None:
    populate(server)
    store = MeshStore()
    async with running(await make_source(server, tmp_path, store, resync=0.1)) as source:
        await eventually(lambda: source.updates >= 3, "updates from resyncs")
        assert len([r for r in server.requests if not r.watch]) == 7  # one list per resource, no polling
        assert workloads(store.state)["10.0.0.1"] == ("mesh/a", True)


async def test_missing_crds_do_not_block_pods_and_namespaces(
        server: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    server.set_missing("AuthorizationPolicy")
    server.set_missing("PeerAuthentication")
    server.create(namespace("mesh", AMBIENT))
    server.create(pod("a", "mesh", ip="10.0.0.1"))
    store = MeshStore()
    async with running(await make_source(server, tmp_path, store)) as source:
        assert workloads(store.state) == {"10.0.0.1": ("mesh/a", True)}
        assert source.informers[AUTHORIZATION_POLICIES].missing
        assert "peerauthentications.security.istio.io CRD installed?" in caplog.text
        await all_watching(server, 5)
        server.create(pod("b", "mesh", ip="10.0.0.2"))  # the other informers watch on
        await eventually(lambda: "10.0.0.2" in store.state.workloads, "a pod while the CRDs are missing")
        server.set_missing("AuthorizationPolicy", False)  # Istio installed later
        server.create(authorization_policy("deny", "mesh", {"action": "DENY", "rules": [{}]}))
        await eventually(lambda: kinds(store.state).get("AuthorizationPolicy") == {"deny"}, "the policy", within=3)


async def test_a_burst_of_events_costs_few_store_updates(server: FakeApiServer, tmp_path: Path) -> None:
    server.create(namespace("mesh", AMBIENT))
    store = MeshStore()
    async with running(await make_source(server, tmp_path, store, debounce=0.05)) as source:
        await all_watching(server)
        before = source.updates
        for i in range(100):
            server.create(pod(f"p{i}", "mesh", ip=f"10.1.{i // 250}.{i % 250 + 1}"))
        await eventually(lambda: len(store.state.workloads) == 100, "100 pods", within=2)
        await asyncio.sleep(0.1)  # any trailing update
        assert 1 <= source.updates - before <= 3


async def test_updates_that_change_nothing_the_store_holds_do_not_reach_it(
        server: FakeApiServer, tmp_path: Path) -> None:
    populate(server)
    store = MeshStore()
    changes: list[MeshState] = []
    store.subscribe(lambda state, _change: changes.append(state))
    async with running(await make_source(server, tmp_path, store)) as source:
        await all_watching(server)
        updates = source.updates
        changes.clear()  # the initial state
        ready = pod("a", "mesh", ip="10.0.0.1", service_account="sa-a")
        ready["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
        server.update(ready)  # a status heartbeat: nothing the workload store keeps
        await eventually(lambda: source.updates > updates, "the update")
        assert changes == []
        server.update(pod("a", "mesh", ip="10.0.0.1", service_account="sa-b"))
        await eventually(lambda: len(changes) == 1, "the identity change")
        assert changes[0].workloads["10.0.0.1"].service_account == "sa-b"


async def test_invalid_objects_are_named_and_skipped(
        server: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    server.create(namespace("mesh", AMBIENT))
    server.create(namespace("bad-ns", {"n": 1}))  # type: ignore[dict-item]  # labels must be strings
    server.create(pod("good", "mesh", ip="10.0.0.1"))
    server.create(pod("bad-labels", "mesh", ip="10.0.0.2", labels={"x": True}))  # type: ignore[dict-item]
    old = pod("old", "mesh", ip="10.0.0.3")
    old["metadata"]["creationTimestamp"] = "2024-01-01T00:00:00Z"
    server.create(old)
    server.create(pod("new", "mesh", ip="10.0.0.3"))  # same IP: the older pod's status is stale
    store = MeshStore()
    async with running(await make_source(server, tmp_path, store)):
        assert workloads(store.state) == {"10.0.0.1": ("mesh/good", True), "10.0.0.3": ("mesh/new", True)}
        assert set(store.state.namespaces) == {"mesh"}
        assert "skipping Pod mesh/bad-labels: metadata.labels must map strings to strings" in caplog.text
        assert "skipping Namespace bad-ns" in caplog.text
        assert "pods mesh/new, mesh/old all claim 10.0.0.3; the newest holds it" in caplog.text
        await all_watching(server)
        server.delete("Pod", "new", "mesh")  # the stale one is the only claimant left
        await eventually(lambda: workloads(store.state).get("10.0.0.3") == ("mesh/old", True), "the older pod")
        warnings = caplog.text.count("skipping Pod mesh/bad-labels")
        server.create(pod("other", "mesh", ip="10.0.0.4"))
        await eventually(lambda: "10.0.0.4" in store.state.workloads, "another pod")
        assert caplog.text.count("skipping Pod mesh/bad-labels") == warnings  # once per object version


async def test_store_is_untouched_until_every_informer_has_listed(server: FakeApiServer, tmp_path: Path) -> None:
    populate(server)
    server.fail("Namespace", 503, times=3, watch=False)
    store = MeshStore()
    states: list[MeshState] = []
    store.subscribe(lambda state, _change: states.append(state))
    async with running(await make_source(server, tmp_path, store), sync=False) as source:
        await eventually(source.informers[PODS].synced.is_set, "the pods listed")
        assert not source.synced.is_set() and states == []  # pods without namespaces would un-enroll them
        await asyncio.wait_for(source.synced.wait(), 3)
        assert workloads(states[0])["10.0.0.1"] == ("mesh/a", True)


async def test_pod_field_selector_is_passed_to_the_server(server: FakeApiServer, tmp_path: Path) -> None:
    populate(server)
    store = MeshStore()
    source = await make_source(server, tmp_path, store, pod_field_selector="spec.nodeName=node-b")
    async with running(source):
        assert workloads(store.state) == {"10.0.1.1": ("plain/b", False)}
        assert all(r.query.get("fieldSelector") == "spec.nodeName=node-b"
                   for r in server.requests if r.path == "/api/v1/pods")


async def test_in_cluster_config_over_tls_with_the_service_account_token(tmp_path: Path) -> None:
    async with FakeApiServer(tls=True, token="sa-token") as server:
        populate(server)
        environ = server.write_service_account(tmp_path / "serviceaccount")
        store = MeshStore()
        source = await KubeSource.from_config(None, store, service_account=tmp_path / "serviceaccount",
                                              environ=environ, backoff=FAST)
        assert source.connection.origin == "in-cluster"
        async with running(source):
            assert workloads(store.state)["10.0.0.1"] == ("mesh/a", True)
            assert server.url.startswith("https://")


async def test_kubeconfig_with_a_ca_and_a_token(tmp_path: Path) -> None:
    async with FakeApiServer(tls=True, token="user-token") as server:
        populate(server)
        store = MeshStore()
        async with running(await make_source(server, tmp_path, store)):
            assert len(store.state.workloads) == 4


@pytest.mark.parametrize(("kubeconfig", "environ", "message"), [
    ("missing.yaml", {}, "does not exist"),
    (None, {"KUBECONFIG": "/nonexistent/config"}, "no kubeconfig at /nonexistent/config"),
    (None, {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}, "in-cluster"),
])
async def test_unusable_config_is_reported(
        tmp_path: Path, kubeconfig: str | None, environ: Mapping[str, str], message: str) -> None:
    with pytest.raises(KubeConfigError, match=message):
        await KubeSource.from_config(tmp_path / kubeconfig if kubeconfig else None, MeshStore(),
                                     environ=environ, service_account=tmp_path / "no-serviceaccount")


def endpoint_ips(state: MeshState, key: str) -> set[str]:
    return set(state.endpoints.get(key, {}))


def web_slice(addresses: list[str], port: int = 8443) -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": "ext-1", "namespace": "mesh", "labels": {"kubernetes.io/service-name": "ext"}},
            "endpoints": [{"addresses": [a]} for a in addresses], "ports": [{"name": "https", "port": port}]}


async def test_services_and_endpoint_slices_follow_the_api(server: FakeApiServer, tmp_path: Path) -> None:
    populate(server)
    ext = service("ext", "mesh", cluster_ip="10.96.0.20", port=443)
    ext["spec"]["selector"] = {}
    ext["spec"]["ports"][0]["name"] = "https"
    store = MeshStore()
    async with running(await make_source(server, tmp_path, store)) as source:
        await all_watching(server)
        server.update(pod("a", "mesh", ip="10.0.0.1", labels={"app": "web"}))  # selected by mesh/web
        await eventually(lambda: endpoint_ips(store.state, "mesh/web") == {"10.0.0.1"}, "a selected pod")
        server.create(ext)
        server.create(web_slice(["10.0.0.1", "10.0.7.7"]))
        await eventually(lambda: endpoint_ips(store.state, "mesh/ext") == {"10.0.0.1", "10.0.7.7"}, "slice endpoints")
        assert store.state.service_at("10.96.0.20", 443, "mesh") is not None
        server.update(web_slice(["10.0.7.8"], port=9443))  # the slice changes
        await eventually(lambda: dict(store.state.endpoints["mesh/ext"]).keys() == {"10.0.7.8"}, "changed slice")
        assert dict(store.state.endpoints["mesh/ext"]["10.0.7.8"].ports) == {443: 9443}
        changed = service("web", "mesh", selector={"app": "web"}, cluster_ip="10.96.0.11")
        server.update(changed)  # a new VIP
        await eventually(lambda: "10.96.0.11" in store.state.vips and "10.96.0.10" not in store.state.vips,
                         "the VIP moved")
        server.delete("Service", "ext", "mesh")
        await eventually(lambda: "mesh/ext" not in store.state.services and "10.96.0.20" not in store.state.vips,
                         "the deleted Service")
        server.drop_watches()  # then changes the client can only learn of by relisting after 410 Gone
        server.delete("Service", "web", "mesh")
        server.create(ext)
        server.compact()
        await eventually(lambda: set(store.state.services) == {"mesh/ext"}
                         and endpoint_ips(store.state, "mesh/ext") == {"10.0.7.8"}, "convergence after 410 Gone")
        assert "10.96.0.11" not in store.state.vips
        assert all(i.relists_gone == 1 for i in source.informers.values())
