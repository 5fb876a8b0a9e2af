"""``ambit status`` and ``ambit policy explain`` read the lab $AMBIT_LAB names, as ``ambit observe`` does
(--lab first, then $AMBIT_LAB, then the only lab, then "ambit")."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.cli import status as status_cli
from agent.lab.runtime import LabInfo, LabPaths, NodeInfo, lab_name
from agent.telemetry.admin import AdminServer
from agent.telemetry.metrics import Metrics

AMBIENT = {"istio.io/dataplane-mode": "ambient"}


def make_lab(root: Path, name: str, *, deny: bool) -> LabPaths:
    """A lab directory as `ambit lab up` leaves it: lab.json with one node, state.yaml with two shop pods (and
    a DENY policy on db when ``deny``)."""
    paths = LabPaths.of(name, root)
    paths.root.mkdir(parents=True)
    LabInfo(name=name, prefix=f"{name}.", phase="running",
            nodes=[NodeInfo(f"{name}-node", 0, f"{name}.n0", "10.0.0.10", "eth0", "10.1.0.0/24")]).save(paths)
    objects: list[dict[str, Any]] = [{"kind": "Namespace", "metadata": {"name": "shop", "labels": AMBIENT}}]
    for pod, ip in (("web", "10.1.0.2"), ("db", "10.1.0.3")):
        objects.append({"kind": "Pod", "metadata": {"name": pod, "namespace": "shop", "labels": {"app": pod}},
                        "spec": {"nodeName": f"{name}-node", "serviceAccountName": pod},
                        "status": {"podIP": ip, "phase": "Running"}})
    if deny:
        objects.append({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                        "metadata": {"name": "no-web", "namespace": "shop"},
                        "spec": {"action": "DENY", "selector": {"matchLabels": {"app": "db"}},
                                 "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/web"]}}]}]}})
    paths.state.write_text(yaml.safe_dump_all(objects))
    return paths


def test_lab_name_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AMBIT_LAB", raising=False)
    assert lab_name(None, tmp_path) == "ambit"  # no lab at all
    make_lab(tmp_path, "one", deny=False)
    assert lab_name(None, tmp_path) == "one"  # the only one
    make_lab(tmp_path, "two", deny=True)
    assert lab_name(None, tmp_path) == "ambit"  # several: the default name (its absence is then reported)
    monkeypatch.setenv("AMBIT_LAB", "two")
    assert lab_name(None, tmp_path) == "two"
    assert lab_name("one", tmp_path) == "one"  # --lab wins


def explain(argv: list[str], root: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = status_cli.policy_main(["explain", "shop/web", "shop/db:5432", *argv], labs_root=root)
    out, err = capsys.readouterr()
    return rc, out, err


def test_policy_explain_reads_the_lab_ambit_lab_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    make_lab(tmp_path, "one", deny=False)
    make_lab(tmp_path, "two", deny=True)
    monkeypatch.delenv("AMBIT_LAB", raising=False)
    rc, _, err = explain([], tmp_path, capsys)  # two labs, none named, no lab "ambit"
    assert rc == 1 and f"{tmp_path / 'ambit' / 'state.yaml'}" in err
    monkeypatch.setenv("AMBIT_LAB", "two")
    rc, out, _ = explain([], tmp_path, capsys)
    assert rc == 0 and out.rstrip().endswith("decision: DENY: denied by AuthorizationPolicy shop/no-web rule 0")
    monkeypatch.setenv("AMBIT_LAB", "one")
    rc, out, _ = explain([], tmp_path, capsys)
    assert rc == 0 and out.rstrip().endswith("decision: ALLOW: allowed: no policy applies")
    rc, out, _ = explain(["--lab", "two"], tmp_path, capsys)  # --lab over $AMBIT_LAB
    assert rc == 0 and "DENY" in out


@pytest.fixture
async def agent_of_lab_two(tmp_path: Path) -> AsyncIterator[Path]:
    """A real admin endpoint on lab two's admin socket, as the agent of two-node serves it."""
    make_lab(tmp_path, "one", deny=False)
    paths = make_lab(tmp_path, "two", deny=True)
    sock = paths.admin_socket("two-node")
    sock.parent.mkdir()
    admin = AdminServer(Metrics(), ready=lambda: (True, ""),
                        config_dump=lambda: {"node": "two-node", "version": "test", "workloads": []})
    await admin.start(metrics=None, ready=None, admin=None, admin_socket=str(sock))
    yield tmp_path
    await admin.close()


async def test_status_asks_the_agents_of_the_lab_ambit_lab_names(agent_of_lab_two: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    root = agent_of_lab_two
    monkeypatch.setenv("AMBIT_LAB", "two")
    rc = await asyncio.to_thread(status_cli.status_main, ["-o", "json"], labs_root=root)
    (dump,) = json.loads(capsys.readouterr().out)
    assert rc == 0 and dump["node"] == "two-node" and dump["where"] == str(root / "two" / "admin" / "two-node.sock")
    monkeypatch.setenv("AMBIT_LAB", "one")  # lab one's agent is not running: asked, and reported unreachable
    rc = await asyncio.to_thread(status_cli.status_main, ["-o", "json"], labs_root=root)
    (dump,) = json.loads(capsys.readouterr().out)
    assert rc == 1 and dump["where"] == str(root / "one" / "admin" / "one-node.sock")
    assert dump["error"].startswith("agent unreachable")
