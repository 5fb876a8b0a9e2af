"""What the agent hands the capture: every address of each enrolled local pod, the others' interfaces hooked."""

from __future__ import annotations

from agent.mesh.store import build_state
from agent.node.capture_plan import capture_plan
from tests.fixtures.mesh_objects import AMBIENT, namespace, pod

INTERFACES = {"10.200.0.10": "lxc0", "10.200.0.11": "lxc1", "fd00:200::12": "lxc2", "10.200.0.13": "lxc3"}


def test_every_address_of_an_enrolled_pod_is_captured_behind_its_one_interface() -> None:
    dual = pod("dual", "mesh", "10.200.0.10", ips=["fd00:200::10"], node="n1")
    dual["spec"]["containers"][0]["readinessProbe"] = {"tcpSocket": {"port": 8081}}
    state = build_state([
        namespace("mesh", AMBIENT), namespace("plain"), dual,
        pod("v4", "mesh", "10.200.0.11", node="n1"),
        pod("v6", "mesh", "fd00:200::12", node="n1"),          # an IPv6-only pod: its primary is IPv6
        pod("out", "plain", "10.200.0.13", ips=["fd00:200::13"], node="n1"),
        pod("gone", "mesh", "10.200.0.14", ips=["fd00:200::14"], node="n1"),  # no interface (not set up yet)
    ])
    plan = capture_plan(state.on_node("n1"), INTERFACES.__getitem__)
    assert plan.capture == {"10.200.0.10": "lxc0", "fd00:200::10": "lxc0", "10.200.0.11": "lxc1",
                            "fd00:200::12": "lxc2"}
    assert plan.hooked == ["lxc3"]  # not enrolled: return-path steering only, whatever its families
    assert plan.probe_ports == {"10.200.0.10": {8081}, "fd00:200::10": {8081}, "10.200.0.11": frozenset(),
                                "fd00:200::12": frozenset()}  # the pod's probes at each of its addresses
    assert [(w.key, why) for w, why in plan.missing] == [("mesh/gone", "'10.200.0.14'")]
