"""Authentication and node authorization of the CA, on real files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from agent.ca.auth import (
    AuthenticationError,
    AuthorizationError,
    Caller,
    NodeAuthorizer,
    NodeTokenFile,
    PodStateFile,
)
from agent.sources.watched import SourceError
from tests.fixtures.ca_lab import PODS, pod, rewrite, write_pods
from tests.fixtures.certificates import spiffe


async def test_token_file_maps_tokens_to_nodes(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    rewrite(path, yaml.safe_dump({"secret-a": "node-a", "secret-b": "node-b"}))
    auth = NodeTokenFile(path)
    caller = await auth.authenticate("secret-b")
    assert caller.node_name == "node-b"
    assert str(path) in caller.subject
    for bad in ("secret-c", "secret-", "secret-a ", ""):
        with pytest.raises(AuthenticationError):
            await auth.authenticate(bad)


async def test_token_file_accepts_json_and_is_reread_on_change(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    rewrite(path, json.dumps({"old": "node-a"}))
    auth = NodeTokenFile(path)
    assert (await auth.authenticate("old")).node_name == "node-a"
    rewrite(path, json.dumps({"new": "node-a"}))
    assert (await auth.authenticate("new")).node_name == "node-a"
    with pytest.raises(AuthenticationError, match="unknown bearer token"):
        await auth.authenticate("old")


async def test_token_file_broken_keeps_last_good_and_missing_fails_closed(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    with pytest.raises(SourceError, match="cannot read token file"):
        await NodeTokenFile(path).authenticate("t")
    rewrite(path, "[not, a, mapping]")
    with pytest.raises(SourceError, match="mapping of token"):
        await NodeTokenFile(path).authenticate("t")
    rewrite(path, "t: node-a\n")
    auth = NodeTokenFile(path)
    assert (await auth.authenticate("t")).node_name == "node-a"
    rewrite(path, "t: [unclosed\n")  # a half-written edit
    assert (await auth.authenticate("t")).node_name == "node-a"
    path.unlink()  # deleting the file revokes every token
    with pytest.raises(SourceError):
        await auth.authenticate("t")


async def test_pod_state_from_a_list(tmp_path: Path) -> None:
    path = tmp_path / "pods.yaml"
    write_pods(path, PODS)
    pods = PodStateFile(path)
    # Succeeded pods no longer count; a pod without serviceAccountName runs as "default".
    assert await pods.service_accounts_on_node("node-a") == {("shop", "web"), ("misc", "default")}
    assert await pods.service_accounts_on_node("node-b") == {("shop", "db")}
    assert await pods.service_accounts_on_node("node-c") == set()


async def test_pod_state_from_multiple_documents_and_reread(tmp_path: Path) -> None:
    path = tmp_path / "pods.yaml"
    docs = [pod("a", None, "node-a", "sa1"),  # no namespace: "default"
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "svc"}},
            pod("b", "ns", "node-a", "sa2", phase="Failed"),
            {"kind": "PodList", "items": [pod("c", "ns", "node-a", "sa3")]}]
    rewrite(path, yaml.safe_dump_all(docs))
    pods = PodStateFile(path)
    assert await pods.service_accounts_on_node("node-a") == {("default", "sa1"), ("ns", "sa3")}
    write_pods(path, [pod("b", "ns", "node-a", "sa2")])
    assert await pods.service_accounts_on_node("node-a") == {("ns", "sa2")}


async def test_node_authorizer_names_node_and_identity(tmp_path: Path) -> None:
    path = tmp_path / "pods.yaml"
    write_pods(path, PODS)
    authorizer = NodeAuthorizer(PodStateFile(path))
    node_a = Caller("node-a", "test")
    await authorizer.authorize(node_a, spiffe("shop", "web"))
    await authorizer.authorize(Caller("node-b", "test"), spiffe("shop", "db"))
    with pytest.raises(AuthorizationError) as e:
        await authorizer.authorize(node_a, spiffe("shop", "db"))
    assert "'node-a'" in str(e.value)
    assert "spiffe://cluster.local/ns/shop/sa/db" in str(e.value)
    with pytest.raises(AuthorizationError):  # finished pods give no identity
        await authorizer.authorize(node_a, spiffe("shop", "batch"))
    with pytest.raises(AuthorizationError):  # unscheduled pods neither
        await authorizer.authorize(node_a, spiffe("shop", "pending"))
