"""The mesh's values as plain data, the one form that status commands show and read: the agents' /config_dump
(read by ``ambit status``) and ``ambit lab status --json``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agent.mesh.model import Endpoint, Service, Workload


def workload(w: Workload) -> dict[str, Any]:
    return {"namespace": w.namespace, "name": w.name, "ip": w.ip, "ips": list(w.ips), "node": w.node,
            "service_account": w.service_account, "enrolled": w.enrolled, "labels": dict(w.labels),
            "probe_ports": sorted(w.probe_ports)}


def service(svc: Service, endpoints: Mapping[str, Endpoint]) -> dict[str, Any]:
    """A Service with its endpoints (by address, as ``MeshState.endpoints`` holds them), sorted by address."""
    return {
        "namespace": svc.namespace, "name": svc.name, "hostname": svc.hostname, "vips": list(svc.vips),
        "ports": [{"port": p.port, "target_port": p.target_port, "target_name": p.target_name,
                   "node_port": p.node_port} for p in svc.ports],
        "external_traffic_policy": "Local" if svc.external_local else "Cluster",
        "endpoints": [{"ip": ep.ip, "node": ep.node, "ports": {str(k): v for k, v in sorted(ep.ports.items())}}
                      for _ip, ep in sorted(endpoints.items())],
    }
