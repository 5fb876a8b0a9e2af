"""What the capture must hold for this node's pods, as one value computed from the mesh state.

Every address of an enrolled pod is captured (both families of a dual-stack pod, ``status.podIPs``), each mapped
to the pod's host interface, which is found once per pod from its primary address (all of a pod's addresses
sit behind its one interface), with the TCP ports its own probes name (the node's connections to them pass at
the pod's door) at each address. The pods that are not enrolled only get their interface hooked, for the return
path of connections the agent makes to them from a client's address. The agent hands this to the capture:
``Redirector.reconcile(plan.capture, plan.hooked)`` and ``Redirector.set_probe_ports(plan.probe_ports)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from agent.mesh.model import Workload


@dataclass
class CapturePlan:
    capture: dict[str, str] = field(default_factory=dict)  # pod address (any family) -> host interface
    hooked: list[str] = field(default_factory=list)  # host interfaces of local pods that are not enrolled
    probe_ports: dict[str, frozenset[int]] = field(default_factory=dict)  # captured address -> its pod's probes
    missing: list[tuple[Workload, str]] = field(default_factory=list)  # pods with no interface here, and why


def capture_plan(local: Iterable[Workload], interface_of: Callable[[str], str]) -> CapturePlan:
    """The plan for this node's workloads ``local``; ``interface_of(ip)`` names the host interface leading to a
    local pod's address, or raises LookupError (the pod is not set up here, or not any more)."""
    plan = CapturePlan()
    for workload in local:
        try:
            ifname = interface_of(workload.ip)
        except LookupError as e:
            plan.missing.append((workload, str(e)))
            continue
        if workload.enrolled:
            plan.capture.update(dict.fromkeys(workload.ips, ifname))
            plan.probe_ports.update(dict.fromkeys(workload.ips, workload.probe_ports))
        else:
            plan.hooked.append(ifname)
    return plan
