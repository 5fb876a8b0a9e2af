"""The CA in a cluster: node agents authenticated by TokenReview, pod placement from a Pod informer.

Authentication (``TokenReviewAuthenticator``): every node agent mounts a projected ServiceAccount token for
the audience ``ambit-ca`` and sends it as its bearer token. The CA asks the API server about it
(``POST authentication.k8s.io/v1 tokenreviews`` with ``audiences: ["ambit-ca"]``) and accepts the caller only
when

- the API server says the token is authenticated AND reports ``ambit-ca`` among the token's audiences (an
  audience-unaware answer, or a token minted for the API server itself, is refused: such a token could have
  been replayed from anywhere it was sent);
- the token belongs to the node agent's ServiceAccount (``system:serviceaccount:ambit-system:ambit-agent``
  by default): a workload's token, even one for the right audience, names no node agent;
- the token names a node: the ``authentication.kubernetes.io/node-name`` extra (bound tokens carry it since
  Kubernetes 1.30), or else the ``spec.nodeName`` of the pod the token is bound to
  (``authentication.kubernetes.io/pod-name``/``pod-uid``; the uid must match, so a token of a deleted and
  re-created pod does not pass for the new one). A token bound to no pod names no node and is refused.

A failure to reach the API server is not a verdict on the token: it surfaces as ``SourceError`` (the service
answers UNAVAILABLE and the agent retries), never as UNAUTHENTICATED. Identical tokens under review at the
same time share one TokenReview (an agent that starts with many pods asks for many certificates at once).

Authorization stays ``NodeAuthorizer``'s; this module gives it ``KubePodDirectory``: one Pod informer
(LIST + WATCH, agent/kube's ``Informer``) indexed by node, so a decision costs a dict lookup and no API call.
The CA needs exactly: ``create`` on ``tokenreviews`` and ``get``/``list``/``watch`` on ``pods``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.ca.auth import AuthenticationError, Caller
from agent.http import HttpError, Timeouts
from agent.kube.client import KubeClient, KubeConfigError
from agent.kube.informer import DEFAULT_BACKOFF, PODS, Delta, Informer, KubeObject, object_key
from agent.retry import Backoff
from agent.sources.watched import SourceError

log = logging.getLogger("ambit.ca.kube")

TOKEN_REVIEWS = "/apis/authentication.k8s.io/v1/tokenreviews"
CA_AUDIENCE = "ambit-ca"
NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
POD_UID_EXTRA = "authentication.kubernetes.io/pod-uid"
_FINISHED_PHASES = frozenset({"Succeeded", "Failed"})


@dataclass(frozen=True, slots=True)
class ServiceAccountRef:
    namespace: str
    name: str

    @classmethod
    def parse(cls, text: str) -> ServiceAccountRef:
        """``NAMESPACE/NAME``."""
        namespace, sep, name = text.partition("/")
        if not sep or not namespace or not name or "/" in name:
            raise ValueError(f"expected NAMESPACE/NAME for a service account, got {text!r}")
        return cls(namespace, name)

    @property
    def username(self) -> str:
        """The user name the API server gives this service account's tokens."""
        return f"system:serviceaccount:{self.namespace}:{self.name}"

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


AGENT_SERVICE_ACCOUNT = ServiceAccountRef("ambit-system", "ambit-agent")


def placement(pod: KubeObject) -> tuple[str, tuple[str, str]] | None:
    """(node, (namespace, service account)) of a pod that is scheduled and not finished, else None."""
    meta, spec, status = pod.get("metadata") or {}, pod.get("spec") or {}, pod.get("status") or {}
    node = spec.get("nodeName")
    if not node or status.get("phase") in _FINISHED_PHASES:
        return None
    sa = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
    return str(node), (str(meta.get("namespace") or "default"), str(sa))


class KubePodDirectory:
    """``PodDirectory`` over the API server: which service accounts run on which node, from a Pod informer.

    ``await run()`` (until cancelled) keeps it current; queries before the first LIST completes wait up to
    ``sync_timeout`` and then raise ``SourceError`` (the caller retries), so a CA that just started never
    refuses an identity only because it has not seen the pod yet.
    """

    def __init__(self, api: KubeClient, *, resync: float | None = 300.0, backoff: Backoff = DEFAULT_BACKOFF,
                 watch_timeout: float = 300.0, sync_timeout: float = 10.0) -> None:
        self.informer = Informer(api, PODS, resync=resync, backoff=backoff, watch_timeout=watch_timeout)
        self.informer.add_handler(self._changed)
        self.sync_timeout = sync_timeout
        self._by_node: dict[str, dict[str, tuple[str, str]]] = {}  # node -> pod key -> (namespace, sa)
        self._node_of: dict[str, str] = {}  # pod key -> node

    @property
    def synced(self) -> asyncio.Event:
        return self.informer.synced

    async def run(self) -> None:
        await self.informer.run()

    async def wait_synced(self) -> None:
        """Until the first LIST is in; ``SourceError`` after ``sync_timeout``."""
        if self.synced.is_set():
            return
        try:
            await asyncio.wait_for(self.synced.wait(), self.sync_timeout)
        except TimeoutError:
            raise SourceError("the pods have not been listed from the Kubernetes API yet") from None

    async def service_accounts_on_node(self, node: str) -> set[tuple[str, str]]:
        await self.wait_synced()
        return set(self._by_node.get(node, {}).values())

    def cached_pod(self, namespace: str, name: str) -> KubeObject | None:
        return self.informer.cache.get(f"{namespace}/{name}")

    def _changed(self, delta: Delta) -> None:
        key = object_key(delta.obj)
        old = self._node_of.pop(key, None)
        if old is not None:
            pods = self._by_node[old]
            pods.pop(key, None)
            if not pods:
                del self._by_node[old]
        if delta.type == "DELETED":
            return
        where = placement(delta.obj)
        if where is not None:
            node, identity = where
            self._by_node.setdefault(node, {})[key] = identity
            self._node_of[key] = node


def _mapping(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _one(extra: Mapping[str, Any], key: str) -> str | None:
    """The single value of a TokenReview ``user.extra`` entry (a list of strings), or None."""
    values = extra.get(key)
    if isinstance(values, str):
        values = [values]
    if not isinstance(values, list) or len(values) != 1 or not isinstance(values[0], str) or not values[0]:
        return None
    return values[0]


class TokenReviewAuthenticator:
    """``Authenticator`` for node agents' projected ServiceAccount tokens (see the module docstring)."""

    def __init__(self, api: KubeClient, *, agent: ServiceAccountRef = AGENT_SERVICE_ACCOUNT,
                 audience: str = CA_AUDIENCE, pods: KubePodDirectory | None = None,
                 request_timeout: float = 10.0) -> None:
        self.api = api
        self.agent = agent
        self.audience = audience
        self.pods = pods  # a cache for the bound-pod lookup; without it (or a miss) the pod is fetched
        self.request_timeout = request_timeout
        self.reviews = 0  # TokenReviews sent, for tests and logs
        self._inflight: dict[bytes, asyncio.Future[Caller]] = {}

    async def authenticate(self, token: str) -> Caller:
        if not token:
            raise AuthenticationError("empty bearer token")
        digest = hashlib.sha256(token.encode()).digest()
        review = self._inflight.get(digest)
        if review is None:
            review = asyncio.ensure_future(self._review(token))
            self._inflight[digest] = review
            review.add_done_callback(lambda done: self._finished(digest, done))
        # Shielded: one caller giving up (a cancelled RPC) does not cancel the review the others wait for.
        return await asyncio.shield(review)

    def _finished(self, digest: bytes, review: asyncio.Future[Caller]) -> None:
        self._inflight.pop(digest, None)
        if not review.cancelled():
            review.exception()  # retrieved: no "exception never retrieved" when every waiter left

    async def _review(self, token: str) -> Caller:
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                "spec": {"token": token, "audiences": [self.audience]}}
        self.reviews += 1
        answer = await self._call(TOKEN_REVIEWS, "POST", body, what="TokenReview", idempotent=True)
        if answer is None:
            raise SourceError("the API server answered the TokenReview with 404: is authentication.k8s.io/v1 served?")
        status = _mapping(answer.get("status"))
        if status.get("authenticated") is not True:
            raise AuthenticationError(f"the API server did not authenticate the token: "
                                      f"{status.get('error') or 'not authenticated'}")
        audiences = status.get("audiences") or []
        if not isinstance(audiences, list) or self.audience not in audiences:
            raise AuthenticationError(f"the token is not for audience {self.audience!r} "
                                      f"(the API server reports audiences {audiences!r})")
        user = _mapping(status.get("user"))
        username = user.get("username")
        if username != self.agent.username:
            raise AuthenticationError(f"the token belongs to {username!r}; only the node agent's service account "
                                      f"{self.agent.username!r} may ask for certificates")
        extra = _mapping(user.get("extra"))
        node = _one(extra, NODE_NAME_EXTRA)
        pod_name, pod_uid = _one(extra, POD_NAME_EXTRA), _one(extra, POD_UID_EXTRA)
        if node is None:
            if pod_name is None:
                raise AuthenticationError("the token is bound to no pod, so it names no node: use a projected "
                                          f"service account token (audience {self.audience!r}) of the agent's pod")
            node = await self._node_of_pod(pod_name, pod_uid)
        where = f" pod {self.agent.namespace}/{pod_name}" if pod_name else ""
        return Caller(node_name=node, subject=f"{username}{where}")

    async def _node_of_pod(self, name: str, uid: str | None) -> str:
        """``spec.nodeName`` of the agent's pod the token is bound to (the cache first, else a GET)."""
        pod = self.pods.cached_pod(self.agent.namespace, name) if self.pods is not None else None
        if pod is None or (uid is not None and (pod.get("metadata") or {}).get("uid") != uid):
            pod = await self._call(f"/api/v1/namespaces/{self.agent.namespace}/pods/{name}", "GET", None,
                                   what=f"pod {self.agent.namespace}/{name}")
        if pod is None:
            raise AuthenticationError(f"the pod {self.agent.namespace}/{name} the token is bound to does not exist")
        meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
        if uid is not None and meta.get("uid") != uid:
            raise AuthenticationError(f"the token is bound to an earlier pod {self.agent.namespace}/{name} "
                                      f"(uid {uid}, now {meta.get('uid')})")
        node = spec.get("nodeName")
        if not isinstance(node, str) or not node:
            raise AuthenticationError(f"the pod {self.agent.namespace}/{name} the token is bound to is not "
                                      "scheduled on a node")
        return node

    async def _call(self, path: str, method: str, body: Mapping[str, Any] | None, *, what: str,
                    idempotent: bool | None = None) -> dict[str, Any] | None:
        """One API request; the JSON object answered, None for 404, ``SourceError`` for anything else.
        ``idempotent``: a TokenReview creates nothing, so it may be sent again (see ``KubeClient.request``)."""
        try:
            reply = await self.api.call(method, path, body=body, timeouts=Timeouts(total=self.request_timeout),
                                        idempotent=idempotent)
        except (HttpError, TimeoutError, OSError) as e:
            log.warning("%s: the Kubernetes API is unreachable: %s", what, str(e) or type(e).__name__)
            raise SourceError(f"{what}: the Kubernetes API is unreachable") from None
        except KubeConfigError as e:  # the CA's own credential cannot be had (an exec plugin failing)
            log.error("%s: %s", what, e)
            raise SourceError(f"{what}: no credential for the Kubernetes API") from None
        if reply.status == 404:
            return None
        answer = reply.json()
        if reply.status not in (200, 201) or not isinstance(answer, dict):
            message = answer.get("message") if isinstance(answer, dict) else reply.body[:200].decode(errors="replace")
            hint = " (does the CA's ClusterRole grant it?)" if reply.status == 403 else ""
            log.error("%s: the Kubernetes API answered %d to %s %s: %s%s", what, reply.status, method, path, message,
                      hint)
            raise SourceError(f"{what}: the Kubernetes API answered {reply.status}")
        return answer
