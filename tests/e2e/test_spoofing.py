"""Source verification (issue 16): a SYN claiming an enrolled pod's address on an interface that is not that pod's
is dropped and counted (a metric and a DROPPED flow with the reason), never captured as that pod.

Lab: 2 nodes, 2 pods each; app-i-1 in ``mesh`` (enrolled), app-i-2 in ``plain``. The attacker crafts SYNs with
a raw socket: from app-1-2 (same node as the victim app-1-1) and from app-2-2 (another node: the SYN reaches
node 1 on its uplink), both forging app-1-1's address.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from agent.lab.runtime import LabInfo, LabPaths, PodInfo
from tests.fixtures import lab_helpers as h
from tests.fixtures import lab_observe as lo
from tests.fixtures import packets
from tests.fixtures.eventually import eventually_sync

pytestmark = lo.lab_marks()


def send_forged(attacker: PodInfo, victim: PodInfo, target: PodInfo, sport: int) -> None:
    packets.send_syn(attacker.netns, victim.ip, target.ip, sport, h.SERVER_PORT)


@pytest.fixture(scope="module")
def lab() -> Iterator[tuple[LabInfo, LabPaths]]:
    with h.running_lab("spoof", nodes=2, pods=2, namespaces=("mesh", "plain")) as (info, paths):
        h.set_namespace_label(paths, "mesh", "ambient")
        lo.wait_agents(paths, ["node-1", "node-2"], captured={
            "node-1": {lo.pod(info, "app-1-1").ip}, "node-2": {lo.pod(info, "app-2-1").ip}})
        yield info, paths


def spoof_drops(paths: LabPaths, node: str) -> float:
    _families, samples = lo.scrape(paths, node)
    return sum(s.value for s in samples if s.name == "hubble_drop_total" and s.labels.get("reason") == "SPOOFED")


def test_a_forged_enrolled_source_is_dropped_and_counted(lab: tuple[LabInfo, LabPaths]) -> None:
    info, paths = lab
    victim, neighbour, remote = (lo.pod(info, n) for n in ("app-1-1", "app-1-2", "app-2-2"))
    before = spoof_drops(paths, "node-1")
    send_forged(neighbour, victim, lo.pod(info, "app-2-1"), 40001)  # same node: the neighbour's veth
    send_forged(remote, victim, neighbour, 40002)  # another node: arrives on node 1's uplink
    eventually_sync(lambda: spoof_drops(paths, "node-1") >= before + 2, "two SPOOFED drops counted on node-1", 5)
    flows = lo.flows(lo.observe(info.name, "--verdict", "DROPPED", "--node-name", "node-1", "--all"))
    spoofs = [f for f in flows if "spoofed" in f.get("drop_reason_desc", "")]
    ports = {lo.tcp(f).get("source_port") for f in spoofs}
    assert {40001, 40002} <= ports, spoofs
    assert all(f["ip"]["source"] == victim.ip for f in spoofs)
    # never captured as the victim: no connection of the victim's with those ports reached the agent
    starts = lo.flows(lo.observe(info.name, "--from-ip", victim.ip, "--type", "start", "--all"))
    assert not [f for f in starts if lo.tcp(f).get("source_port") in (40001, 40002)]


def test_the_victims_own_traffic_still_flows(lab: tuple[LabInfo, LabPaths]) -> None:
    info, _paths = lab
    server = h.EchoServer(lo.pod(info, "app-2-1")).start()
    try:
        h.transfer(lo.pod(info, "app-1-1"), lo.pod(info, "app-2-1"), h.Payload.make(64 << 10))
    finally:
        server.close()
