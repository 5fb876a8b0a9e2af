"""Lab topology: namespaces come and go without leftovers; every pod reaches every other pod."""

from __future__ import annotations

import os
import secrets
import subprocess

import pytest

from agent.capture import netns
from agent.lab import Lab, topology
from tests.fixtures.lab_helpers import reachable


def test_up_down_leaves_nothing_and_pods_reach_each_other() -> None:
    before = netns.list_netns()
    lab = Lab.up(nodes=2, pods_per_node=2)
    try:
        assert len(lab.nodes) == 2 and len(lab.pods) == 4
        assert set(lab.namespaces) <= set(netns.list_netns())
        assert len({p.ip for p in lab.pods}) == 4 and len({n.ip for n in lab.nodes}) == 2
        for src in lab.pods:
            for dst in lab.pods:
                if src is not dst:
                    assert reachable(src.netns, dst.ip), f"{src.ip} -> {dst.ip}"
        node = lab.nodes[0]
        assert reachable(node.netns, lab.pods[2].ip)  # node -> pod on another node
        assert lab.pods[0].host_ifname in {link["ifname"] for link in lab.links(node.netns)}
    finally:
        lab.down()
    assert netns.list_netns() == before
    lab.down()  # idempotent


@pytest.mark.parametrize("bridge", [False, True], ids=["routed", "bridge"])
def test_dual_stack_every_pod_reaches_every_other_over_both_families(bridge: bool) -> None:
    prefix = f"ads{secrets.token_hex(2)}-"
    lab = Lab.up(nodes=2, pods_per_node=2, prefix=prefix, bridge=bridge, dual_stack=True)
    try:
        assert [p.ip6 for p in lab.pods] == ["fd00:200::10", "fd00:200::11", "fd00:200:1::10", "fd00:200:1::11"]
        assert [n.ip6 for n in lab.nodes] == ["fd00:192:168::10", "fd00:192:168::11"]
        unreachable = [(src.netns, dst_ip) for src in lab.pods for dst in lab.pods if src is not dst
                       for dst_ip in (dst.ip, dst.ip6) if not reachable(src.netns, dst_ip)]
        unreachable += [(node.netns, pod.ip6) for node in lab.nodes for pod in lab.pods
                        if not reachable(node.netns, pod.ip6)]
        assert unreachable == []
    finally:
        lab.down()
    assert [n for n in netns.list_netns() if n.startswith(prefix)] == []


def test_partial_failure_cleans_up(monkeypatch: pytest.MonkeyPatch) -> None:
    prefix = f"abt{secrets.token_hex(2)}-"
    real = topology._ip_batch
    calls = {"n": 0}

    def flaky(ns: str | None, commands: list[str]) -> None:
        calls["n"] += 1
        if calls["n"] == 3:  # after the switch and the first node were configured
            raise RuntimeError("injected failure")
        real(ns, commands)

    monkeypatch.setattr(topology, "_ip_batch", flaky)
    with pytest.raises(RuntimeError, match="injected"):
        Lab.up(nodes=2, pods_per_node=1, prefix=prefix)
    assert [n for n in netns.list_netns() if n.startswith(prefix)] == []


def test_context_manager_and_running_things_inside() -> None:
    before = netns.list_netns()
    with pytest.raises(ValueError, match="boom"), Lab.up(nodes=1, pods_per_node=1) as lab:
        pod = lab.pods[0]
        out = lab.exec(pod.netns, ["ip", "-o", "-4", "addr", "show", "dev", "eth0"]).stdout
        assert f"{pod.ip}/32" in out
        inode = lab.call(pod.netns, lambda: os.stat("/proc/thread-self/ns/net").st_ino)
        assert inode == os.stat(netns.netns_path(pod.netns)).st_ino
        assert os.stat("/proc/thread-self/ns/net").st_ino != inode  # back in our own namespace
        proc = lab.popen(pod.netns, ["ip", "-o", "link", "show", "eth0"], stdout=subprocess.PIPE)
        assert b"eth0" in proc.communicate(timeout=10)[0]
        raise ValueError("boom")
    assert netns.list_netns() == before


def _report_inode(conn: object) -> None:
    conn.send(os.stat("/proc/thread-self/ns/net").st_ino)  # type: ignore[attr-defined]


def test_python_process_in_namespace_and_parallel_labs() -> None:
    import multiprocessing

    with Lab.up(nodes=1, pods_per_node=1) as one, Lab.up(nodes=1, pods_per_node=1) as two:
        assert not set(one.namespaces) & set(two.namespaces)
        parent, child = multiprocessing.Pipe()
        proc = netns.start_process(two.pods[0].netns, _report_inode, child)
        try:
            assert parent.poll(10)
            assert parent.recv() == os.stat(netns.netns_path(two.pods[0].netns)).st_ino
        finally:
            proc.join(5)
        # same addresses in both labs, fully isolated from each other
        assert one.pods[0].ip == two.pods[0].ip
        assert reachable(one.nodes[0].netns, one.pods[0].ip)
