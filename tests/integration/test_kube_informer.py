"""Informers against the API-server fake over real HTTP, with the real client (agent/kube/client.py)."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import pytest

from agent.kube import AUTHORIZATION_POLICIES, PODS, Connection, Delta, Informer, connect
from agent.retry import Backoff
from tests.fixtures.eventually import eventually
from tests.fixtures.kube_fake import FakeApiServer, authorization_policy, pod, service

FAST = Backoff(initial=0.02, cap=0.2)


@pytest.fixture
async def server() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer() as s:
        yield s


@pytest.fixture
async def connection(server: FakeApiServer, tmp_path: Path) -> AsyncIterator[Connection]:
    conn = await connect(server.write_kubeconfig(tmp_path / "kubeconfig"))
    yield conn
    await conn.close()


@asynccontextmanager
async def running(informer: Informer) -> AsyncIterator[list[Delta]]:
    """Run ``informer`` (synced on entry) and collect its deltas."""
    deltas: list[Delta] = []
    informer.add_handler(deltas.append)
    task = asyncio.create_task(informer.run())
    try:
        await asyncio.wait_for(informer.synced.wait(), 3)
        yield deltas
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@contextmanager
def no_exceptions_logged(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    yield
    assert not [r for r in caplog.records if r.exc_info], "an exception was logged"


def names(informer: Informer) -> set[str]:
    return {o["metadata"]["name"] for o in informer.cache.values()}


async def test_list_pages_gives_kind_and_drops_managed_fields(server: FakeApiServer, connection: Connection) -> None:
    for i in range(7):
        server.create(pod(f"p{i}", ip=f"10.0.0.{i + 1}"))
    listed_at = server.resource_version
    informer = Informer(connection.api, PODS, backoff=FAST, page_size=3)
    async with running(informer) as deltas:
        assert names(informer) == {f"p{i}" for i in range(7)}
        assert informer.resource_version == str(listed_at)
        for obj in informer.cache.values():
            assert obj["kind"] == "Pod" and obj["apiVersion"] == "v1"  # list items come without them
            assert "managedFields" not in obj["metadata"]
        assert [d.type for d in deltas] == ["ADDED"] * 7
        lists = [r for r in server.requests if r.path == "/api/v1/pods" and not r.watch]
        assert [r.query.get("limit") for r in lists] == ["3"] * 3
        assert [bool(r.query.get("continue")) for r in lists] == [False, True, True]
        await eventually(lambda: server.watchers("Pod") == 1, "the pod watch")
        assert connection.api.http.connections_opened == 1  # keep-alive: three pages and the watch on one


async def test_watch_applies_events_from_the_listed_version(server: FakeApiServer, connection: Connection) -> None:
    server.create(pod("a", ip="10.0.0.1"))
    informer = Informer(connection.api, PODS, backoff=FAST)
    async with running(informer) as deltas:
        listed = informer.resource_version
        await eventually(lambda: server.watchers("Pod") == 1, "the pod watch")
        watch = server.watch_requests("Pod")[0]
        assert watch.query["resourceVersion"] == listed
        assert watch.query["allowWatchBookmarks"] == "true"
        assert int(watch.query["timeoutSeconds"]) >= 300
        deltas.clear()
        server.create(pod("b", ip="10.0.0.2"))
        server.update(pod("a", ip="10.0.0.1", labels={"v": "2"}))
        server.delete("Pod", "b")
        await eventually(lambda: len(deltas) == 3, "three deltas")
        assert [(d.type, d.obj["metadata"]["name"]) for d in deltas] == [
            ("ADDED", "b"), ("MODIFIED", "a"), ("DELETED", "b")]
        assert deltas[1].old is not None and deltas[1].old["metadata"]["labels"] == {}
        assert informer.cache["default/a"]["metadata"]["labels"] == {"v": "2"}
        assert names(informer) == {"a"}
        assert informer.resource_version == str(server.resource_version)
        assert informer.lists == 1


async def test_bookmark_advances_version_so_a_reconnect_needs_no_relist(
        server: FakeApiServer, connection: Connection) -> None:
    server.create(pod("a", ip="10.0.0.1"))
    informer = Informer(connection.api, PODS, backoff=FAST)
    async with running(informer):
        await eventually(lambda: server.watchers("Pod") == 1, "the pod watch")
        for i in range(3):  # other kinds move the cluster's resourceVersion, pods see nothing of it
            server.create(service(f"s{i}"))
        assert informer.resource_version != str(server.resource_version)
        assert server.bookmark() == 1
        await eventually(lambda: informer.bookmarks == 1, "the bookmark")
        assert informer.resource_version == str(server.resource_version)
        bookmarked = informer.resource_version
        # History compacted past the pods' last change: only the bookmark keeps the watch resumable.
        server.compact()
        server.drop_watches()
        await eventually(lambda: informer.watches == 2 and server.watchers("Pod") == 1, "the re-opened watch")
        assert server.watch_requests("Pod")[-1].query["resourceVersion"] == bookmarked
        assert (informer.lists, informer.relists_gone) == (1, 0)


async def test_gone_error_event_relists_and_delivers_the_gap(server: FakeApiServer, connection: Connection) -> None:
    for name in "abc":
        server.create(pod(name, ip=f"10.0.0.{ord(name)}"))
    informer = Informer(connection.api, PODS, backoff=FAST)
    async with running(informer) as deltas:
        await eventually(lambda: server.watchers("Pod") == 1, "the pod watch")
        deltas.clear()
        server.drop_watches()  # nothing awaits from here to compact(): the client sees none of it by watch
        server.delete("Pod", "b")
        server.update(pod("c", ip="10.0.0.99"))
        server.create(pod("d", ip="10.0.0.100"))
        server.compact()
        await eventually(lambda: names(informer) == {"a", "c", "d"}, "convergence after the relist")
        assert (informer.lists, informer.relists_gone) == (2, 1)
        assert sorted((d.type, d.obj["metadata"]["name"]) for d in deltas) == [
            ("ADDED", "d"), ("DELETED", "b"), ("MODIFIED", "c")]
        assert informer.cache["default/c"]["status"]["podIP"] == "10.0.0.99"
        # The 410 came as a watch event: the server answered 200 and then an ERROR with code 410.
        assert server.watch_requests("Pod")[-2].query["resourceVersion"] != informer.resource_version


async def test_gone_http_status_relists(server: FakeApiServer, connection: Connection) -> None:
    server.create(pod("a", ip="10.0.0.1"))
    informer = Informer(connection.api, PODS, backoff=FAST)
    async with running(informer):
        await eventually(lambda: server.watchers("Pod") == 1, "the pod watch")
        server.fail("Pod", 410, watch=True)
        server.drop_watches()
        server.delete("Pod", "a")
        server.create(pod("e", ip="10.0.0.5"))
        await eventually(lambda: names(informer) == {"e"}, "convergence after the relist")
        assert (informer.lists, informer.relists_gone) == (2, 1)


async def test_dropped_connections_reconnect_with_exponential_backoff(
        server: FakeApiServer, connection: Connection, caplog: pytest.LogCaptureFixture) -> None:
    backoff = Backoff(initial=0.03, cap=1.0, jitter=0.25)
    server.create(pod("a", ip="10.0.0.1"))
    server.create(pod("b", ip="10.0.0.2"))
    informer = Informer(connection.api, PODS, backoff=backoff)
    async with running(informer):
        await eventually(lambda: server.watchers("Pod") == 1, "the pod watch")
        before = len(server.watch_requests("Pod"))
        server.fail("Pod", 503, times=4, watch=True)  # the API server is "restarting"
        server.drop_watches()
        server.delete("Pod", "a")  # kept in history: the resumed watch replays it
        await eventually(lambda: names(informer) == {"b"}, "convergence after reconnecting", within=5)
        attempts = [r.at for r in server.watch_requests("Pod")[before:]]
        assert len(attempts) == 5  # four refused, the fifth carried the deletion
        gaps = [b - a for a, b in itertools.pairwise(attempts)]
        for failures, gap in enumerate(gaps, start=2):  # the wait after the 2nd, 3rd... failure in a row
            assert gap >= 0.95 * 0.75 * backoff.initial * 2 ** (failures - 1), gaps
        assert informer.failures == 0 and informer.lists == 1
    assert "503" in caplog.text


async def test_resync_redelivers_the_cache_without_listing(server: FakeApiServer, connection: Connection) -> None:
    server.create(pod("a", ip="10.0.0.1"))
    server.create(pod("b", ip="10.0.0.2"))
    informer = Informer(connection.api, PODS, backoff=FAST, resync=0.05)
    async with running(informer) as deltas:
        await eventually(lambda: informer.resyncs >= 3, "three resyncs")
        resynced = [d.obj["metadata"]["name"] for d in deltas if d.type == "RESYNC"]
        assert resynced.count("a") >= 3 and resynced.count("b") >= 3
        assert len([r for r in server.requests if r.path == "/api/v1/pods" and not r.watch]) == 1


async def test_missing_crd_is_an_empty_synced_collection_until_installed(
        server: FakeApiServer, connection: Connection, caplog: pytest.LogCaptureFixture) -> None:
    server.set_missing("AuthorizationPolicy")
    informer = Informer(connection.api, AUTHORIZATION_POLICIES, backoff=FAST)
    async with running(informer):
        assert informer.cache == {} and informer.missing
        assert "authorizationpolicies.security.istio.io CRD installed?" in caplog.text
        await eventually(lambda: informer.failures >= 3, "retries")
        assert caplog.text.count("CRD installed?") == 1  # said once, not at every retry
        server.set_missing("AuthorizationPolicy", False)
        server.create(authorization_policy("deny-all", "mesh"))
        await eventually(lambda: names(informer) == {"deny-all"}, "the policy once the CRD is there")
        assert not informer.missing
        server.set_missing("AuthorizationPolicy")  # the CRD is deleted: its objects are gone with it
        await eventually(lambda: informer.cache == {}, "the policy gone with its CRD")


async def test_invalid_objects_are_logged_and_skipped(
        server: FakeApiServer, connection: Connection, caplog: pytest.LogCaptureFixture) -> None:
    server.create(pod("good", ip="10.0.0.1"))
    server.create(pod("", ip="10.0.0.2"))  # no name: cannot be keyed
    informer = Informer(connection.api, PODS, backoff=FAST)
    with no_exceptions_logged(caplog):
        async with running(informer):
            assert names(informer) == {"good"}
            assert "skipping an invalid object (Pod default/)" in caplog.text
            await eventually(lambda: server.watchers("Pod") == 1, "the pod watch")
            server.update(pod("", ip="10.0.0.3"))
            server.create(pod("later", ip="10.0.0.4"))
            await eventually(lambda: names(informer) == {"good", "later"}, "the valid pod after the invalid one")
            assert informer.resource_version == str(server.resource_version)


async def test_unauthorized_is_an_error_and_never_syncs(
        server: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    server.token = "right"
    conn = await connect(server.write_kubeconfig(tmp_path / "kubeconfig"))
    server.token = "rotated"
    informer = Informer(conn.api, PODS, backoff=FAST)
    task = asyncio.create_task(informer.run())
    try:
        await eventually(lambda: informer.failures >= 3, "retries")
        assert not informer.synced.is_set()
        assert any(r.levelno == logging.ERROR and "401" in r.getMessage() for r in caplog.records)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await conn.close()
