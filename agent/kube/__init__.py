"""Kubernetes source for the agent's workload store: informers (LIST + WATCH) over ``kubernetes_asyncio``.

Why kubernetes_asyncio (over lightkube): the agent needs the raw list/watch protocol for six resources, two
of them Istio custom resources, with exact control over resourceVersions, bookmarks and 410 Gone, and the
objects as plain dicts (``build_state`` and the policy engine read dicts; decoding every pod into a model
class costs time and memory for nothing). kubernetes_asyncio's ``ApiClient.call_api`` gives an authenticated,
streaming aiohttp response for any path, core or custom alike, with no model decoding, while the library
keeps the hard part of the client: the official client's config loaders (in-cluster service account with token
rotation, kubeconfig with client certificates, tokens, exec plugins and OIDC). lightkube is typed and pleasant,
but its list/watch decode into model objects and its watch manages resourceVersions and errors itself, so
bookmarks and relist-on-410 could not be driven (or tested) the way client-go's reflector does; raw paths
are not its public surface.

Start it from the agent::

    source = await KubeSource.from_config(kubeconfig_or_None, store)
    task = asyncio.create_task(source.run())
    await source.synced.wait()  # the store now holds the whole cluster
    ...
    await source.close()
"""

from agent.kube.client import Connection, KubeConfigError, connect
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
    "KubeConfigError",
    "KubeSource",
    "NotFound",
    "Resource",
    "connect",
]
