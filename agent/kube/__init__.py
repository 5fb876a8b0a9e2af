"""Kubernetes source for the agent's workload store: informers (LIST + WATCH) over a small client of our own.

The agent needs the raw list/watch protocol for seven resources, two of them Istio custom resources, with
exact control over resourceVersions, bookmarks and 410 Gone, and the objects as plain dicts (``build_state`` and
the policy engine read dicts; decoding every pod into a model class costs time and memory for nothing). So
informer.py speaks the protocol itself, and all it asks of a client is an authenticated HTTP request whose
response it can stream; the CA (agent/ca/kube.py) adds a TokenReview POST and a pod GET, and the agent's
shutdown a DaemonSet GET (lifecycle.py).

Why our own client (client.py, on aiohttp, which the agent has anyway) rather than kubernetes_asyncio, which
this package used before: memory. Importing kubernetes_asyncio loads its generated client, some 700 model and
API modules, and cost the agent 60 MB (RSS and PSS, measured with ``import kubernetes_asyncio.client``) of the
~100 MB an idle agent held, against a target of 40 MB for the whole agent; we used none of those models. Importing
``agent.kube.source`` fell from 74 MB to 36 MB, and the idle agent's PSS in a lab from FIXME. What the library
did for us is here now, checked by tests/integration/test_kube_client.py: the in-cluster service account (its
token file re-read every minute), kubeconfig files as kubectl reads them (merged ``$KUBECONFIG``, contexts,
CA bundles, client certificates, tokens, token files, ``insecure-skip-tls-verify``, exec credential plugins
re-run before their credential expires), each problem named by file, entry and field (kubeconfig.py,
credentials.py, tls.py). Not supported, and refused with an error rather than ignored: kubeconfig
``auth-provider`` (OIDC and the removed cloud providers: use an exec plugin such as kubelogin), ``proxy-url``
and impersonation. lightkube was not an option either: its list/watch decode into model objects and manage
resourceVersions themselves, so bookmarks and relist-on-410 could not be driven (or tested) the way client-go's
reflector does.

Start it from the agent::

    source = await KubeSource.from_config(kubeconfig_or_None, store)
    task = asyncio.create_task(source.run())
    await source.synced.wait()  # the store now holds the whole cluster
    ...
    await source.close()
"""

from agent.kube.client import Connection, KubeClient, KubeConfigError, connect
from agent.kube.informer import (
    AUTHORIZATION_POLICIES,
    ENDPOINT_SLICES,
    NAMESPACES,
    PEER_AUTHENTICATIONS,
    PODS,
    RESOURCES,
    SERVICES,
    ApiError,
    Delta,
    Gone,
    Informer,
    NotFound,
    Resource,
)
from agent.kube.source import KubeSource

__all__ = [
    "AUTHORIZATION_POLICIES",
    "ENDPOINT_SLICES",
    "NAMESPACES",
    "PEER_AUTHENTICATIONS",
    "PODS",
    "RESOURCES",
    "SERVICES",
    "ApiError",
    "Connection",
    "Delta",
    "Gone",
    "Informer",
    "KubeClient",
    "KubeConfigError",
    "KubeSource",
    "NotFound",
    "Resource",
    "connect",
]
