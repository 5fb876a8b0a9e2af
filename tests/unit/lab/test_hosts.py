"""Pods' hosts files: the names a pod resolves Services by; rewritten in place; removed with the lab."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.lab import hosts, services
from tests.unit.lab import objects as o


def test_a_pod_resolves_every_service_qualified_and_its_own_namespaces_by_short_name() -> None:
    mesh, errors = services.mesh_state([
        o.namespace("default"), o.namespace("shop"),
        o.pod("a", "10.200.0.10", app="web"), o.pod("b", "10.200.0.11", namespace="shop", app="db"),
        o.pod("c", "10.200.1.12", namespace="shop", app="db"),
        o.service("web", selector={"app": "web"}, clusterIP="10.96.0.10"),
        o.service("web", "shop", selector={"app": "web"}, clusterIP="10.96.0.11"),
        o.service("db", "shop", selector={"app": "db"}, clusterIP="None"),
        o.service("mail", type="ExternalName", externalName="mail.example.org", ports=[]),
    ])
    assert errors == []
    assert hosts.hosts_file(mesh, "default", "a", ["10.200.0.10"]).splitlines()[1:] == [
        "127.0.0.1\tlocalhost",
        "::1\tlocalhost ip6-localhost ip6-loopback",
        "10.200.0.10\ta",
        "10.96.0.10\tweb web.default web.default.svc web.default.svc.cluster.local",
        # headless: its endpoints' addresses
        "10.200.0.11\tdb.shop db.shop.svc db.shop.svc.cluster.local",
        "10.200.1.12\tdb.shop db.shop.svc db.shop.svc.cluster.local",
        "10.96.0.11\tweb.shop web.shop.svc web.shop.svc.cluster.local",
    ]
    shop = hosts.hosts_file(mesh, "shop", "b", ["10.200.0.11"]).splitlines()
    assert "10.96.0.11\tweb web.shop web.shop.svc web.shop.svc.cluster.local" in shop
    assert "10.96.0.10\tweb.default web.default.svc web.default.svc.cluster.local" in shop


def test_a_dual_stack_pod_is_named_at_both_addresses() -> None:
    mesh, errors = services.mesh_state([o.namespace("default")])
    assert errors == []
    lines = hosts.hosts_file(mesh, "default", "a", ["10.200.0.10", "fd00:200::10"]).splitlines()
    assert lines[3:] == ["10.200.0.10\ta", "fd00:200::10\ta"]


@pytest.fixture
def etc_netns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "etc" / "netns"
    monkeypatch.setattr(hosts, "ETC_NETNS", root)
    return root


def test_files_are_rewritten_in_place(etc_netns: Path) -> None:
    """The bind mount of `ip netns exec` holds the inode: a new file would go unseen by running processes."""
    hosts.write_pod("lab.x-n0p0", "10.96.0.1\tweb and a long line\n")
    target = etc_netns / "lab.x-n0p0" / "hosts"
    inode = target.stat().st_ino
    hosts.write_pod("lab.x-n0p0", "10.96.0.2\tweb\n")
    assert target.read_text() == "10.96.0.2\tweb\n" and target.stat().st_ino == inode
    assert (etc_netns / "lab.x-n0p0" / "resolv.conf").read_text().splitlines()[1] == "nameserver 127.0.0.1"
    before = os.stat(target).st_mtime_ns
    hosts.write_pod("lab.x-n0p0", "10.96.0.2\tweb\n")  # unchanged: not written
    assert os.stat(target).st_mtime_ns == before


def test_remove_takes_the_labs_files_and_leaves_others(etc_netns: Path) -> None:
    for name in ("lab.x-n0p0", "lab.x-n1p0", "other.y-n0p0"):
        hosts.write_pod(name, "\n")
    (etc_netns / "lab.stray").mkdir()  # a directory of the lab from a torn run, not recorded
    assert hosts.remove(["lab.x-n0p0"], "lab.") == []
    assert sorted(os.listdir(etc_netns)) == ["other.y-n0p0"]
    assert hosts.remove([], "other.") == []
    assert not etc_netns.exists()  # emptied: gone too
    (etc_netns / "lab.kept").mkdir(parents=True)
    (etc_netns / "lab.kept" / "something-else").write_text("not ours")
    left = hosts.remove([], "lab.")
    assert left == [f"{etc_netns / 'lab.kept'}: Directory not empty"]
