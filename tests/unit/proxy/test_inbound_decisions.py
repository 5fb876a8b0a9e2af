"""The inbound side's decisions, without sockets: what a CONNECT's headers say of the caller and the Service,
and the policy verdict for each way in (HBONE with a proven identity, same node, plaintext), on the
transport-neutral Connection record, with the target port after Service resolution."""

from __future__ import annotations

from typing import Any

import pytest

from agent.mesh.store import MeshStore
from agent.policy import Decision, Peer, Target
from agent.proxy.authorize import Authorizer
from agent.proxy.inputs import Connection, forwarded_client, forwarded_host
from hbone.identity import SpiffeId

SERVER_IP = "10.0.2.1"


@pytest.mark.parametrize(("headers", "source", "client"), [
    ({"forwarded": 'for="10.0.1.1:41000";host=web.shop.svc.cluster.local'}, ("10.0.1.1", 15008), ("10.0.1.1", 41000)),
    ({"forwarded": 'for="[fd00::1]:41000"'}, ("fd00::1", 15008), ("fd00::1", 41000)),
    ({"forwarded": 'for="10.9.9.9:41000"'}, ("10.0.1.1", 15008), ("10.0.1.1", 15008)),  # not the tunnel's peer
    ({}, ("10.0.1.1", 15008), ("10.0.1.1", 15008)),
    # IPv6 compared as addresses: another peer's spelling of the same address, not its text
    ({"forwarded": 'for="[FD00:0:0::1]:41000"'}, ("fd00::1", 15008), ("fd00::1", 41000)),
    ({"forwarded": 'for="[fd00::2]:41000"'}, ("fd00::1", 15008), ("fd00::1", 15008)),
    ({"forwarded": 'for="[fd00:::1]:41000"'}, ("fd00::1", 15008), ("fd00::1", 15008)),  # not an address at all
    ({"forwarded": 'for="[::ffff:10.0.1.1]:41000"'}, ("10.0.1.1", 15008), ("10.0.1.1", 41000)),  # mapped: IPv4
])
def test_the_caller_is_the_tunnels_peer_with_the_applications_port(
        headers: dict[str, str], source: tuple[str, int], client: tuple[str, int]) -> None:
    assert forwarded_client(headers, source) == client


def test_the_service_named_by_the_source_agent() -> None:
    assert forwarded_host({"forwarded": 'for="10.0.1.1:1";host=web.shop.svc.cluster.local'}) == \
        "web.shop.svc.cluster.local"
    assert forwarded_host({"forwarded": 'for="10.0.1.1:1"'}) is None


def objects(*policies: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"kind": "Namespace", "metadata": {"name": "shop", "labels": {"istio.io/dataplane-mode": "ambient"}}},
        {"kind": "Pod", "metadata": {"name": "web-1", "namespace": "shop", "labels": {"app": "web"}},
         "spec": {"nodeName": "n2", "serviceAccountName": "web"}, "status": {"phase": "Running", "podIP": SERVER_IP}},
        *policies]


STRICT = {"kind": "PeerAuthentication", "metadata": {"name": "strict", "namespace": "shop"},
          "spec": {"mtls": {"mode": "STRICT"}}}
ALLOW_8080_FROM_CLIENT = {
    "kind": "AuthorizationPolicy", "metadata": {"name": "web", "namespace": "shop"},
    "spec": {"selector": {"matchLabels": {"app": "web"}}, "action": "ALLOW",
             "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/client"]}}],
                        "to": [{"operation": {"ports": ["8080"]}}]}]}}
CLIENT = SpiffeId("cluster.local", "shop", "client")
OTHER = SpiffeId("cluster.local", "shop", "other")


@pytest.mark.parametrize(("policies", "connection", "denied_by"), [
    ((), Connection(None, ("10.0.1.1", 1), (SERVER_IP, 8080)), None),  # no policy: plaintext allowed
    ((STRICT,), Connection(None, ("10.0.1.1", 1), (SERVER_IP, 8080)), "PeerAuthentication shop/strict"),
    ((STRICT,), Connection(CLIENT, ("10.0.1.1", 1), (SERVER_IP, 8080)), None),  # HBONE or same node: an identity
    ((ALLOW_8080_FROM_CLIENT,), Connection(CLIENT, ("10.0.1.1", 1), (SERVER_IP, 8080),
                                           "web.shop.svc.cluster.local"), None),  # via the VIP: the target port
    ((ALLOW_8080_FROM_CLIENT,), Connection(CLIENT, ("10.0.1.1", 1), (SERVER_IP, 80)), "no ALLOW policy matched"),
    ((ALLOW_8080_FROM_CLIENT,), Connection(OTHER, ("10.0.1.1", 1), (SERVER_IP, 8080)), "no ALLOW policy matched"),
    ((), Connection(CLIENT, ("10.0.1.1", 1), ("10.0.9.9", 8080)), "no workload"),
])
def test_policy_decides_on_the_connection_record(policies: tuple[dict[str, Any], ...], connection: Connection,
                                                 denied_by: str | None) -> None:
    store = MeshStore()
    assert store.apply(objects(*policies)) == []
    denial = Authorizer(store)(connection)
    if denied_by is None:
        assert denial is None
    else:
        assert denial is not None and denied_by in f"{denial.policy} {denial.reason}", denial


def test_a_relabelled_pod_is_decided_on_with_its_new_labels() -> None:
    """The authorizer keeps the engine's inputs per state: a change of the pod shows in the next decision."""
    store = MeshStore()
    assert store.apply(objects(ALLOW_8080_FROM_CLIENT)) == []
    authorize = Authorizer(store)
    connection = Connection(OTHER, ("10.0.1.1", 1), (SERVER_IP, 8080))
    assert authorize(connection) is not None  # selected by the ALLOW policy, which does not name OTHER
    assert authorize(Connection(CLIENT, ("10.0.1.1", 2), (SERVER_IP, 8080))) is None
    relabelled = objects()[1] | {"metadata": {"name": "web-1", "namespace": "shop", "labels": {"app": "db"}}}
    assert store.apply([relabelled]) == []
    assert authorize(connection) is None  # no policy selects it any more
    assert store.apply([], deletes=[("Pod", "shop", "web-1")]) == []
    denial = authorize(connection)
    assert denial is not None and "no workload" in denial.reason


def test_answers_are_kept_per_peer_client_ip_and_target_until_the_policies_change(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A new connection from the same peer and IP to the same pod port is answered from memory (the client's port
    is no input of L4 policy); a policy change, published as the agent publishes it, decides afresh."""
    store = MeshStore()
    assert store.apply(objects(ALLOW_8080_FROM_CLIENT)) == []
    authorize = Authorizer(store)
    store.subscribe(lambda state, change: authorize.update(state) if change.objects else None)
    evaluated: list[tuple[Peer, Target]] = []
    evaluate = authorize.engine.evaluate

    def counted(peer: Peer, target: Target) -> Decision:
        evaluated.append((peer, target))
        return evaluate(peer, target)

    monkeypatch.setattr(authorize.engine, "evaluate", counted)
    for port in (1, 2, 3):
        assert authorize(Connection(OTHER, ("10.0.1.1", port), (SERVER_IP, 8080))) is not None
    assert len(evaluated) == 1
    assert authorize(Connection(OTHER, ("10.0.1.2", 1), (SERVER_IP, 8080))) is not None  # another IP: decided
    assert len(evaluated) == 2
    assert store.apply([], deletes=[("AuthorizationPolicy", "shop", "web")]) == []
    assert authorize(Connection(OTHER, ("10.0.1.1", 4), (SERVER_IP, 8080))) is None  # no policy left: allowed
    assert len(evaluated) == 3
