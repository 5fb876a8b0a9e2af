"""The API-server fake itself, seen with a plain HTTP client: the wire protocol other tests rely on."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.fixtures.kube_fake import FakeApiServer, namespace, pod


@pytest.fixture
async def server() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer() as s:
        yield s


async def get(server: FakeApiServer, path: str, **query: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.get(server.url + path, params=query) as response:
        return response.status, await response.json()


async def watch_lines(server: FakeApiServer, path: str, count: int, **query: str) -> list[Any]:
    """The first ``count`` events of a watch (or fewer, if the server ends the stream)."""
    events: list[Any] = []
    async with aiohttp.ClientSession() as session, session.get(
            server.url + path, params={"watch": "true", **query}) as response:
        assert response.status == 200
        assert response.headers.get("Transfer-Encoding") == "chunked"
        while len(events) < count and (line := await response.content.readline()):
            events.append(json.loads(line))
    return events


async def test_list_is_a_kind_list_with_a_resource_version(server: FakeApiServer) -> None:
    server.create(namespace("mesh"))
    server.create(pod("a", "mesh", ip="10.0.0.1"))
    server.create(pod("b", "other", ip="10.0.0.2", node="node-b"))
    status, body = await get(server, "/api/v1/pods")
    assert status == 200 and body["kind"] == "PodList" and body["apiVersion"] == "v1"
    assert body["metadata"]["resourceVersion"] == str(server.resource_version)
    assert [i["metadata"]["name"] for i in body["items"]] == ["a", "b"]
    assert all("kind" not in i for i in body["items"])  # as kube-apiserver: items carry no kind
    _, scoped = await get(server, "/api/v1/namespaces/mesh/pods")
    assert [i["metadata"]["name"] for i in scoped["items"]] == ["a"]
    _, selected = await get(server, "/api/v1/pods", fieldSelector="spec.nodeName=node-b")
    assert [i["metadata"]["name"] for i in selected["items"]] == ["b"]
    status, body = await get(server, "/api/v1/namespaces/mesh")
    assert status == 200 and body["kind"] == "Namespace"


async def test_watch_replays_history_and_answers_410_once_compacted(server: FakeApiServer) -> None:
    server.create(pod("a", ip="10.0.0.1"))
    since = server.resource_version
    server.update(pod("a", ip="10.0.0.1", labels={"v": "2"}))
    server.delete("Pod", "a")
    events = await watch_lines(server, "/api/v1/pods", 2, resourceVersion=str(since), timeoutSeconds="1")
    assert [e["type"] for e in events] == ["MODIFIED", "DELETED"]
    assert int(events[1]["object"]["metadata"]["resourceVersion"]) == server.resource_version
    server.compact()
    events = await watch_lines(server, "/api/v1/pods", 5, resourceVersion=str(since))
    assert len(events) == 1 and events[0]["type"] == "ERROR"
    assert events[0]["object"]["kind"] == "Status" and events[0]["object"]["code"] == 410


async def test_missing_resource_is_a_404_status(server: FakeApiServer) -> None:
    server.set_missing("PeerAuthentication")
    status, body = await get(server, "/apis/security.istio.io/v1/peerauthentications")
    assert status == 404 and body["kind"] == "Status" and body["reason"] == "NotFound"
    _, groups = await get(server, "/apis")
    assert "security.istio.io" in [g["name"] for g in groups["groups"]]  # AuthorizationPolicies still served


async def test_routes_can_be_added_before_start() -> None:
    server = FakeApiServer(token="t")

    async def token_review(request: web.Request) -> web.Response:
        return web.json_response({"kind": "TokenReview", "status": {"authenticated": True}})

    server.app.router.add_post("/apis/authentication.k8s.io/v1/tokenreviews", token_review)
    async with server, aiohttp.ClientSession(headers={"Authorization": "Bearer t"}) as session, session.post(
            server.url + "/apis/authentication.k8s.io/v1/tokenreviews", json={}) as response:
        assert response.status == 200 and (await response.json())["kind"] == "TokenReview"
