"""Kubernetes objects for the lab's unit tests: namespaces, running pods, Services, EndpointSlices."""

from __future__ import annotations

from typing import Any

from agent.lab.state import namespace_object, pod_object


def namespace(name: str) -> dict[str, Any]:
    return namespace_object(name)


def pod(name: str, ip: str, node: str = "node-1", namespace: str = "default", *, ready: bool = True,
        ports: dict[str, int] | None = None, **labels: str) -> dict[str, Any]:
    obj = pod_object(namespace=namespace, name=name, uid=f"uid-{namespace}-{name}", node=node, pod_ips=[ip],
                     host_ip="192.168.200.10", service_account=name, labels=labels)
    if not ready:
        obj["status"]["conditions"] = [{"type": "Ready", "status": "False"}]
    if ports:
        obj["spec"]["containers"] = [{"name": "app", "ports": [{"name": n, "containerPort": p}
                                                              for n, p in ports.items()]}]
    return obj


def service(name: str, namespace: str = "default", *, selector: dict[str, Any] | None = None,
            ports: list[dict[str, Any]] | None = None, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"ports": ports if ports is not None else [{"port": 80, "targetPort": 8080}], **spec}
    if selector is not None:
        body["selector"] = selector
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace},
            "spec": body}


def endpoint_slice(name: str, service_name: str, addresses: list[tuple[str, str]], port: int,
                   namespace: str = "default") -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": name, "namespace": namespace,
                         "labels": {"kubernetes.io/service-name": service_name}},
            "ports": [{"port": port, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "nodeName": node} for ip, node in addresses]}
