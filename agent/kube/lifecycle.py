"""Uninstall or upgrade? What istio-cni asks on shutdown: if the agent's own DaemonSet is gone or being deleted,
Ambit is being removed from the cluster and the agent takes everything it made off the node (pods go back to
plain networking); otherwise a new agent is coming (an upgrade, a node drain, a crash) and the node stays
fail-closed for it to adopt."""

from __future__ import annotations

import json
import logging
from typing import cast

import aiohttp
from kubernetes_asyncio.client import ApiClient

log = logging.getLogger(__name__)
ANSWER_WITHIN = 5.0  # seconds: the pod is terminating, its grace period is short


async def daemonset_removed(api: ApiClient, namespace: str, name: str) -> bool:
    """True when DaemonSet ``namespace/name`` no longer exists or carries a deletionTimestamp. An answer that
    says neither (the API unreachable, forbidden) counts as an upgrade: keeping the capture fails closed."""
    path = f"/apis/apps/v1/namespaces/{namespace}/daemonsets/{name}"
    try:
        response = cast(aiohttp.ClientResponse, await api.call_api(
            path, "GET", header_params={"Accept": "application/json"}, auth_settings=["BearerToken"],
            _preload_content=False, _request_timeout=aiohttp.ClientTimeout(total=ANSWER_WITHIN)))
        async with response:
            body = await response.read()
    except (aiohttp.ClientError, OSError, TimeoutError) as e:
        log.warning("cannot tell whether DaemonSet %s/%s is being deleted (%s): keeping the capture", namespace,
                    name, e)
        return False
    if response.status == 404:
        return True
    if response.status != 200:
        log.warning("DaemonSet %s/%s: the API answered %d: keeping the capture", namespace, name, response.status)
        return False
    try:
        meta = json.loads(body).get("metadata") or {}
    except (ValueError, AttributeError):
        return False
    return bool(meta.get("deletionTimestamp"))
