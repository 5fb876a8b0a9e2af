"""Uninstall or upgrade? What istio-cni asks on shutdown: if the agent's own DaemonSet is gone or being deleted,
Ambit is being removed from the cluster and the agent takes everything it made off the node (pods go back to
plain networking); otherwise a new agent is coming (an upgrade, a node drain, a crash) and the node stays
fail-closed for it to adopt."""

from __future__ import annotations

import logging

from agent.http import HttpError, Timeouts
from agent.kube.client import KubeClient, KubeConfigError

log = logging.getLogger(__name__)
ANSWER_WITHIN = 5.0  # seconds: the pod is terminating, its grace period is short


async def daemonset_removed(api: KubeClient, namespace: str, name: str) -> bool:
    """True when DaemonSet ``namespace/name`` no longer exists or carries a deletionTimestamp. An answer that
    says neither (the API unreachable, forbidden) counts as an upgrade: keeping the capture fails closed."""
    path = f"/apis/apps/v1/namespaces/{namespace}/daemonsets/{name}"
    try:
        reply = await api.call("GET", path, timeouts=Timeouts(total=ANSWER_WITHIN))
    except (HttpError, OSError, TimeoutError, KubeConfigError) as e:
        log.warning("cannot tell whether DaemonSet %s/%s is being deleted (%s): keeping the capture", namespace,
                    name, e)
        return False
    if reply.status == 404:
        return True
    if reply.status != 200:
        log.warning("DaemonSet %s/%s: the API answered %d: keeping the capture", namespace, name, reply.status)
        return False
    daemonset = reply.json()
    meta = daemonset.get("metadata") if isinstance(daemonset, dict) else None
    return isinstance(meta, dict) and bool(meta.get("deletionTimestamp"))
