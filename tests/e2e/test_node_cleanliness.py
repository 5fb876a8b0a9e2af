"""Uninstall versus upgrade (issue 16): after `ambit lab down`, after a graceful uninstall, and after five
agent restarts, the kernel holds exactly what it held before: programs, maps, tc filters, rules, routes, pins,
namespaces (compared, not assumed).

Programs and maps are machine-wide, so the counts are of Ambit's own (by name); other tests running at the
same time on the machine may load theirs, so each comparison waits (bounded) for the counts to settle.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from dataclasses import dataclass

from agent.capture import bpfsys, netns
from agent.capture.loader import MAPS
from agent.lab import control
from agent.lab.runtime import LabInfo
from tests.fixtures import lab_helpers as h
from tests.fixtures import lab_observe as lo
from tests.fixtures.eventually import eventually_sync

pytestmark = lo.lab_marks()

PROG_NAMES = ("ambit_pod_ingre", "ambit_uplink_in", "ambit_sk_lookup")  # the kernel keeps 15 characters


@dataclass(frozen=True)
class Kernel:
    programs: int
    maps: Counter[str]
    filters: int  # our tc filters on every interface of the lab's nodes
    rules: int
    routes: int
    nft_tables: int  # the agent's conntrack exemption (agent.capture.conntrack)

    @classmethod
    def of(cls, info: LabInfo | None) -> Kernel:
        programs = sum(1 for pid in bpfsys.prog_ids() if _prog_name(pid) in PROG_NAMES)
        maps = Counter(m.name for m in bpfsys.map_infos() if m.name in MAPS)
        filters = rules = routes = tables = 0
        for node in info.nodes if info is not None else []:
            links = netns.run(node.netns, ["ip", "-o", "link", "show"]).stdout.splitlines()
            for dev in (line.split(":")[1].strip().split("@")[0] for line in links):
                filters += len(h.ambit_filters(node.netns, dev))
            rules += len(h.mark_rules(node.netns))
            routes += len(h.local_routes(node.netns))
            tables += netns.run(node.netns, ["nft", "list", "tables"]).stdout.splitlines().count("table inet ambit")
        return cls(programs, maps, filters, rules, routes, tables)


def _prog_name(prog_id: int) -> str:
    try:
        return bpfsys.prog_info_by_id(prog_id).name
    except OSError:  # unloaded meanwhile
        return ""


def settles_to(want: Kernel, info: LabInfo | None, what: str) -> None:
    """Until the kernel holds what ``want`` says, machine-wide objects at most that many: a lab of an earlier
    test may still be freeing its own (RCU), which only lowers the counts."""
    last: list[Kernel] = []

    def same() -> bool:
        now = last[:] = [Kernel.of(info)]
        got = now[0]
        return (got.programs <= want.programs and all(got.maps[k] <= v for k, v in want.maps.items())
                and not set(got.maps) - set(want.maps)
                and (got.filters, got.rules, got.routes, got.nft_tables)
                == (want.filters, want.rules, want.routes, want.nft_tables))

    try:
        eventually_sync(same, what, 15, interval=0.2)
    except AssertionError:
        raise AssertionError(f"{what}: wanted {want}, got {last[0]}") from None


def test_lab_down_leaves_nothing() -> None:
    before = Kernel.of(None)
    with h.running_lab("clean", nodes=2, pods=2, namespaces=("mesh",)) as (info, paths):
        h.set_namespace_label(paths, "mesh", "ambient")
        lo.wait_agents(paths, ["node-1", "node-2"], captured={
            n.name: {p.ip for p in info.pods if p.node == n.name} for n in info.nodes})
        assert Kernel.of(info).programs > before.programs
    settles_to(before, None, "the kernel as before the lab")  # running_lab checked namespaces and processes


def test_graceful_uninstall_and_five_restarts() -> None:
    before = Kernel.of(None)
    with h.running_lab("clean", nodes=1, pods=2, namespaces=("mesh",)) as (info, paths):
        node = info.nodes[0]
        h.set_namespace_label(paths, "mesh", "ambient")
        lo.wait_agents(paths, [node.name], captured={node.name: {p.ip for p in info.pods}})
        running = Kernel.of(info)
        assert running.filters >= 3 and running.rules == 2 and running.routes == 1 and running.nft_tables == 1, running
        for i in range(5):  # upgrades: the new agent adopts what is there, nothing accumulates
            control.stop_agents(paths, [node.name])
            control.start_agents(info, paths, [node.name], 60)
            lo.wait_agents(paths, [node.name], captured={node.name: {p.ip for p in info.pods}})
            settles_to(running, info, f"the kernel after restart {i + 1}")
        control.stop_agents(paths, [node.name])  # stopped: still fail-closed, everything in place
        assert Kernel.of(info).filters == running.filters
        out = subprocess.run([sys.executable, "-m", "agent.cli", "uninstall-node", "--netns", node.netns,
                              "--instance", node.name], capture_output=True, text=True, timeout=60, check=False)
        assert out.returncode == 0 and "node clean" in out.stdout, out.stderr
        settles_to(Kernel(before.programs, before.maps, 0, 0, 0, 0), info, "the node after uninstall-node")
        server = h.EchoServer(info.pods[1]).start()  # no agent runs: fail-closed would drop this; released, it flows
        try:
            h.transfer(info.pods[0], info.pods[1], h.Payload.make(16 << 10))
        finally:
            server.close()
    settles_to(before, None, "the kernel as before the lab")

