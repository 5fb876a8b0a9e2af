"""Kubernetes source for the agent's workload store: informers (LIST + WATCH) over a small client of our own.

The agent needs the raw list/watch protocol for seven resources, two of them Istio custom resources, with
exact control over resourceVersions, bookmarks and 410 Gone, and the objects as plain dicts (``build_state`` and
the policy engine read dicts; decoding every pod into a model class costs time and memory for nothing). So
informer.py speaks the protocol itself, and all it asks of a client is an authenticated HTTP request whose
response it can stream; the CA (agent/ca/kube.py) adds a TokenReview POST and a pod GET, and the agent's
shutdown a DaemonSet GET (lifecycle.py).

Why our own client (client.py, on agent/http's small HTTP/1.1 client; aiohttp before, itself 9.4 MiB PSS, see
agent/http/__init__.py) rather than kubernetes_asyncio, which this package used before: memory. Importing
kubernetes_asyncio loads its generated client (768 model modules alone) and its dependencies: 60 MiB in a bare
interpreter, and still 36.5 MiB PSS (950 modules) on top of everything else the agent imports, of an idle agent's 99
MiB, against a target of 40 MB for the whole agent. We used none of those models. Without it, ``import
agent.__main__`` takes 75 MiB RSS instead of 112 (809 modules instead of 1,761; 0.4-0.6 s instead of 0.7-1.2 s), and
an idle agent in a lab (2 enrolled pods) holds 59 MiB PSS instead of 99 (issue 11; tests/e2e/test_agent_memory.py).
What the library did for us is here now, checked by tests/integration/test_kube_client.py and tests/unit/kube/: the
in-cluster service account (its token file re-read every minute), kubeconfig files as kubectl reads them (merged
``$KUBECONFIG``, contexts, CA bundles, client certificates, tokens, token files, ``insecure-skip-tls-verify``,
``tls-server-name``, exec credential plugins re-run before their credential expires), each problem named by file,
entry and field (kubeconfig.py, credentials.py, tls.py). Not supported, and refused with an error rather than
ignored: kubeconfig ``auth-provider`` (OIDC and the removed cloud providers: use an exec plugin such as kubelogin),
``proxy-url`` and impersonation. lightkube was not an option either: its list/watch decode into model objects and
manage resourceVersions themselves, so bookmarks and relist-on-410 could not be driven (or tested) the way
client-go's reflector does.

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
