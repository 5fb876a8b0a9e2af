"""Uninstall or upgrade, told from the agent's DaemonSet as the API server has it (the real list/watch
protocol's fake, a real client)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.kube.client import connect
from agent.kube.lifecycle import daemonset_removed
from tests.fixtures.kube_fake import DEFAULT_RESOURCES, FakeApiServer, FakeResource

DAEMONSETS = FakeResource("apps", "v1", "daemonsets", "DaemonSet", namespaced=True)


def daemonset(deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "ambit-agent", "namespace": "ambit-system"}
    if deleting:
        meta["deletionTimestamp"] = "2026-12-05T10:00:00Z"
    return {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": meta, "spec": {}}


@pytest.fixture
async def server() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer([*DEFAULT_RESOURCES, DAEMONSETS]) as s:
        yield s


async def test_an_existing_daemonset_means_an_upgrade(server: FakeApiServer, tmp_path: Path) -> None:
    server.create(daemonset())
    connection = await connect(server.write_kubeconfig(tmp_path / "kubeconfig"))
    try:
        assert not await daemonset_removed(connection.api, "ambit-system", "ambit-agent")
        server.update(daemonset(deleting=True))  # foreground deletion: the object stays, marked
        assert await daemonset_removed(connection.api, "ambit-system", "ambit-agent")
        server.delete("DaemonSet", "ambit-agent", "ambit-system")  # background deletion: gone at once
        assert await daemonset_removed(connection.api, "ambit-system", "ambit-agent")
    finally:
        await connection.close()


async def test_an_api_that_cannot_answer_keeps_the_capture(tmp_path: Path) -> None:
    async with FakeApiServer([*DEFAULT_RESOURCES, DAEMONSETS]) as server:
        server.create(daemonset(deleting=True))
        connection = await connect(server.write_kubeconfig(tmp_path / "kubeconfig"))
        server.fail("DaemonSet", 503, times=1, watch=False)
        assert not await daemonset_removed(connection.api, "ambit-system", "ambit-agent")  # 503: not told
    try:  # the server is gone now: unreachable
        assert not await daemonset_removed(connection.api, "ambit-system", "ambit-agent")
    finally:
        await connection.close()
