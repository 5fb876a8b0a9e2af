"""TokenReview for the API-server fake (tests/kube_fake.py), as kube-apiserver answers it. No tests here.

``TokenReviews(server)`` adds ``POST /apis/authentication.k8s.io/v1/tokenreviews`` to a ``FakeApiServer`` that has
not started yet (through ``server.app.router``, which the fake leaves open for this); tests then issue tokens:

- ``bound(...)``: a projected ServiceAccount token with its audiences, bound to a pod (name and uid), with
  the ``authentication.kubernetes.io/node-name`` extra unless ``with_node=False`` (clusters before 1.30);
- ``expire(token)``: the token stops authenticating, as one past its ``exp`` does;
- ``audience_unaware=True``: the token is answered as an authenticator that ignores audiences answers
  (authenticated, no ``status.audiences``), which a client asking for an audience must not accept.

The answer follows kube-apiserver: 201 with the review's ``status``; ``authenticated`` only when the token is
known, unexpired and shares an audience with ``spec.audiences`` (no ``spec.audiences``: the API server's
own); ``status.audiences`` is that intersection; ``error`` says why not otherwise. Every review is kept in
``requests``.
"""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.kube_fake import FakeApiServer, status

API_SERVER_AUDIENCE = "https://kubernetes.default.svc.cluster.local"
TOKEN_REVIEWS = "/apis/authentication.k8s.io/v1/tokenreviews"


@dataclass
class IssuedToken:
    namespace: str
    service_account: str
    audiences: list[str]
    pod_name: str | None = None
    pod_uid: str | None = None
    node: str | None = None
    expired: bool = False
    audience_unaware: bool = False

    @property
    def username(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.service_account}"


@dataclass
class TokenReviews:
    server: FakeApiServer
    tokens: dict[str, IssuedToken] = field(default_factory=dict)
    requests: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.server.app.router.add_post(TOKEN_REVIEWS, self._review)

    def bound(self, namespace: str, service_account: str, *, pod: str | None, pod_uid: str | None = None,
              node: str | None = None, with_node: bool = True, audiences: tuple[str, ...] = ("ambit-ca",),
              audience_unaware: bool = False) -> str:
        """A new token; ``pod=None`` makes one bound to no pod (a TokenRequest without a bound object)."""
        token = "tok-" + secrets.token_urlsafe(24)
        self.tokens[token] = IssuedToken(namespace, service_account, list(audiences), pod,
                                         pod_uid or (str(uuid.uuid4()) if pod else None),
                                         node if with_node else None, audience_unaware=audience_unaware)
        return token

    def expire(self, token: str) -> None:
        self.tokens[token].expired = True

    def reviews_of(self, token: str) -> int:
        return sum(1 for r in self.requests if (r.get("spec") or {}).get("token") == token)

    async def _review(self, request: web.Request) -> web.Response:
        try:
            review = await request.json()
        except ValueError:
            return web.json_response(status(400, "BadRequest", "the body is not JSON"), status=400)
        if not isinstance(review, dict) or review.get("kind") != "TokenReview" or \
                review.get("apiVersion") != "authentication.k8s.io/v1":
            return web.json_response(status(400, "BadRequest", "expected an authentication.k8s.io/v1 TokenReview"),
                                     status=400)
        self.requests.append(review)
        spec = review.get("spec") or {}
        wanted = spec.get("audiences") or [API_SERVER_AUDIENCE]
        issued = self.tokens.get(str(spec.get("token") or ""))
        result: dict[str, Any]
        if issued is None:
            result = {"authenticated": False, "user": {}, "error": "[invalid bearer token, square/go-jose: error in "
                                                                   "cryptographic primitive]"}
        elif issued.expired:
            result = {"authenticated": False, "user": {}, "error": "[invalid bearer token, service account token "
                                                                   "has expired]"}
        elif not issued.audience_unaware and not (common := [a for a in wanted if a in issued.audiences]):
            result = {"authenticated": False, "user": {},
                      "error": f"[invalid bearer token, token audiences {issued.audiences} is invalid for the "
                               f"target audiences {wanted}]"}
        else:
            extra: dict[str, list[str]] = {}
            if issued.pod_name:
                extra["authentication.kubernetes.io/pod-name"] = [issued.pod_name]
                extra["authentication.kubernetes.io/pod-uid"] = [str(issued.pod_uid)]
            if issued.node:
                extra["authentication.kubernetes.io/node-name"] = [issued.node]
            extra["authentication.kubernetes.io/credential-id"] = [f"JTI={uuid.uuid4()}"]
            result = {"authenticated": True, "audiences": [] if issued.audience_unaware else common,
                      "user": {"username": issued.username, "uid": str(uuid.uuid4()),
                               "groups": ["system:serviceaccounts", f"system:serviceaccounts:{issued.namespace}",
                                          "system:authenticated"],
                               "extra": extra}}
        return web.json_response({"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1",
                                  "metadata": {"creationTimestamp": None}, "spec": spec, "status": result},
                                 status=201)
