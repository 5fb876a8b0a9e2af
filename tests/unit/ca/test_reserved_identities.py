"""The CA's API never issues an identity of Ambit's own namespace (the operator's reads every node's flows),
even to the node where a pod runs with that service account; workloads are served as before."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from agent.ca.auth import AuthorizationError, Caller, NodeAuthorizer, PodStateFile
from agent.telemetry.observer_tls import observer_identity, operator_identity
from hbone.identity import SpiffeId


async def test_ambit_system_identities_are_refused_to_every_node(tmp_path: Path) -> None:
    pods = tmp_path / "pods.yaml"
    pods.write_text(yaml.safe_dump_all([
        {"kind": "Pod", "metadata": {"name": name, "namespace": ns}, "spec": {"nodeName": "node-a",
                                                                              "serviceAccountName": sa}}
        for name, ns, sa in (("sneaky", "ambit-system", "ambit-operator"), ("agent", "ambit-system", "ambit-agent"),
                             ("web", "shop", "web"))]))
    authorizer = NodeAuthorizer(PodStateFile(pods))
    caller = Caller("node-a", "test")
    for identity in (operator_identity("cluster.local"), observer_identity("cluster.local")):
        with pytest.raises(AuthorizationError) as e:
            await authorizer.authorize(caller, identity)
        assert str(e.value) == (f"{identity} is an identity of Ambit's own namespace 'ambit-system': issued "
                                "offline only (`ambit ca --issue`), never to a node agent")
    await authorizer.authorize(caller, SpiffeId("cluster.local", "shop", "web"))  # a workload: as before
