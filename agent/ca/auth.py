"""Who may ask Ambit's CA for which certificate.

Two questions, answered by two pluggable parts:

* Authentication (``Authenticator``): the bearer token on the request names a caller, and the node that
  caller runs on. The lab uses ``NodeTokenFile`` (token -> node name). In a cluster the token is the node
  agent's projected ServiceAccount token: a TokenReview authenticator then checks the token with the API
  server, and takes the node from the token's bound-object claims (``authentication.kubernetes.io/node-name``,
  or the bound pod's ``spec.nodeName``). It only has to return a ``Caller``, so it drops in without any
  change here or in the service.
* Authorization (``NodeAuthorizer``): like istiod's node authorizer, a node agent may only obtain the
  identity of a workload that is scheduled on its own node. Which service accounts run where comes from a
  ``PodDirectory``; the lab reads a file of Pod objects (``PodStateFile``), a cluster would use a Pod
  informer.

Both lab files are re-read whenever they change, so tokens and pods can be edited while the CA runs.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import yaml

from agent.identity.ca_client import CA_NAMESPACE
from agent.sources.objectfile import kubernetes_objects
from agent.sources.watched import WatchedFile
from hbone import SpiffeId

log = logging.getLogger("ambit.ca.auth")

T = TypeVar("T")

_FINISHED_PHASES = frozenset({"Succeeded", "Failed"})


class AuthenticationError(Exception):
    """The request's credentials do not identify a caller (gRPC UNAUTHENTICATED)."""


class AuthorizationError(Exception):
    """An authenticated caller asked for something it may not have (gRPC PERMISSION_DENIED)."""


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated node agent."""

    node_name: str
    subject: str  # who the credential belongs to, for logs: "token-file:<path>", "system:serviceaccount:..."


class Authenticator(Protocol):
    async def authenticate(self, token: str) -> Caller:
        """The caller ``token`` belongs to; raises AuthenticationError otherwise."""
        ...


class PodDirectory(Protocol):
    async def service_accounts_on_node(self, node: str) -> set[tuple[str, str]]:
        """(namespace, service account) of every pod that is scheduled on ``node`` and not finished."""
        ...


class Authorizer(Protocol):
    async def authorize(self, caller: Caller, identity: SpiffeId) -> None:
        """Returns when ``caller`` may obtain a certificate for ``identity``; raises AuthorizationError."""
        ...


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _parse_tokens(data: bytes) -> list[tuple[bytes, str]]:
    try:
        doc = yaml.safe_load(data)
    except yaml.YAMLError as e:
        raise ValueError(str(e)) from None
    if doc is None:
        return []
    if not isinstance(doc, dict):
        raise ValueError("expected a mapping of token -> node name")
    entries = []
    for token, node in doc.items():
        if not isinstance(token, str) or not token or not isinstance(node, str) or not node:
            raise ValueError("every entry must map a non-empty token string to a non-empty node name")
        entries.append((_digest(token), node))
    return entries


class NodeTokenFile:
    """Lab authenticator: a YAML or JSON mapping of bearer token -> node name."""

    def __init__(self, path: Path) -> None:
        self._file = WatchedFile(path, _parse_tokens, "token file")

    async def authenticate(self, token: str) -> Caller:
        if not token:
            raise AuthenticationError("empty bearer token")
        digest = _digest(token)
        node: str | None = None
        # Compare fixed-size digests against every entry without stopping early: the time taken does not
        # depend on how much of a token an attacker got right, nor on which entry matched.
        for known, name in self._file.get():
            if hmac.compare_digest(known, digest):
                node = name
        if node is None:
            raise AuthenticationError("unknown bearer token")
        return Caller(node_name=node, subject=f"token-file:{self._file.path}")


def _parse_pods(data: bytes) -> dict[str, frozenset[tuple[str, str]]]:
    by_node: dict[str, set[tuple[str, str]]] = {}
    for obj in kubernetes_objects(data):
        if not isinstance(obj, dict) or obj.get("kind") != "Pod":
            continue
        meta = obj.get("metadata") or {}
        spec = obj.get("spec") or {}
        status = obj.get("status") or {}
        node = spec.get("nodeName")
        if not node or status.get("phase") in _FINISHED_PHASES:
            continue  # not scheduled yet, or will never run again
        namespace = meta.get("namespace") or "default"
        sa = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
        by_node.setdefault(str(node), set()).add((str(namespace), str(sa)))
    return {node: frozenset(sas) for node, sas in by_node.items()}


class PodStateFile:
    """Lab pod directory: Pods from a YAML file (a ``kind: List`` or several YAML documents)."""

    def __init__(self, path: Path) -> None:
        self._file = WatchedFile(path, _parse_pods, "pod state file")

    async def service_accounts_on_node(self, node: str) -> set[tuple[str, str]]:
        return set(self._file.get().get(node, frozenset()))


class NodeAuthorizer:
    """A node agent may only obtain identities of workloads scheduled on its own node, and never one of
    Ambit's own namespace: those (the CA's, the Observer's, the operator's, whose certificate reads every
    node's flows) are made only offline by whoever holds the CA's key (``ambit ca --issue``), so no pod that
    happens to run there, nor a node agent, can mint them."""

    def __init__(self, pods: PodDirectory, reserved_namespace: str = CA_NAMESPACE) -> None:
        self._pods = pods
        self._reserved = reserved_namespace

    async def authorize(self, caller: Caller, identity: SpiffeId) -> None:
        if identity.namespace == self._reserved:
            raise AuthorizationError(f"{identity} is an identity of Ambit's own namespace {self._reserved!r}: "
                                     "issued offline only (`ambit ca --issue`), never to a node agent")
        on_node = await self._pods.service_accounts_on_node(caller.node_name)
        if (identity.namespace, identity.service_account) not in on_node:
            raise AuthorizationError(
                f"node {caller.node_name!r} may not obtain {identity}: no running pod with service account "
                f"{identity.service_account!r} in namespace {identity.namespace!r} is scheduled on it")
