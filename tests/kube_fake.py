"""A Kubernetes API server fake that speaks the real HTTP list/watch protocol, for tests of real clients.

What it does as kube-apiserver does:

- LIST ``/api/v1/pods``, ``/apis/<group>/<version>/<plural>`` (and the ``namespaces/<ns>/`` forms): a ``<Kind>List``
  with ``metadata.resourceVersion``, items without ``kind``/``apiVersion``, ``limit``/``continue`` paging over
  a consistent snapshot, ``fieldSelector``/``labelSelector`` (equality and existence forms).
- WATCH (``?watch=true``): a chunked 200 response of newline-delimited JSON events. From ``resourceVersion``
  N, the history after N is replayed and then live events follow; with no version (or "0"), ADDED for every
  current object first. A version older than the retained history gets ``ERROR`` with a 410 ``Status`` and
  the stream ends. ``allowWatchBookmarks=true`` watches receive BOOKMARK events; ``timeoutSeconds`` ends the
  stream cleanly.
- One resourceVersion counter for all objects, increasing with every change; deletions get a version too.
- Errors as ``Status`` objects: 401 without the bearer token (when one is set), 404 for a resource "not
  installed", injected faults.

Test controls: ``create``/``update``/``apply``/``delete``, ``compact`` (forget history), ``drop_watches``
(abort every watch connection), ``bookmark``, ``set_missing`` (404, as a CRD not installed), ``fail`` (the
next requests answer an error status), ``watchers`` and ``requests`` to observe the client.

Extending: ``server.app.router`` takes more routes before ``start()`` (e.g. a POST for TokenReviews); a
static path wins over the generic resource routes. The bearer-token check applies to every route.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import datetime
import ipaddress
import json
import ssl
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

Obj = dict[str, Any]
_MINUTES_5, _DAY = datetime.timedelta(minutes=5), datetime.timedelta(days=1)


@dataclass(frozen=True, slots=True)
class FakeResource:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


DEFAULT_RESOURCES = (
    FakeResource("", "v1", "namespaces", "Namespace", namespaced=False),
    FakeResource("", "v1", "pods", "Pod", namespaced=True),
    FakeResource("", "v1", "services", "Service", namespaced=True),
    FakeResource("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", namespaced=True),
    FakeResource("", "v1", "nodes", "Node", namespaced=False),
    FakeResource("security.istio.io", "v1", "authorizationpolicies", "AuthorizationPolicy", namespaced=True),
    FakeResource("security.istio.io", "v1", "peerauthentications", "PeerAuthentication", namespaced=True),
)


@dataclass(frozen=True, slots=True)
class RequestRecord:
    method: str
    path: str
    query: Mapping[str, str]
    at: float  # time.monotonic()

    @property
    def watch(self) -> bool:
        return self.query.get("watch") in ("true", "1")


@dataclass(eq=False)  # hashed by identity: kept in a set
class _Watcher:
    resource: FakeResource
    namespace: str | None
    matches: Callable[[Obj], bool]
    bookmarks: bool
    request: web.Request
    queue: asyncio.Queue[Obj | None] = field(default_factory=asyncio.Queue)  # None: drop the connection


@dataclass
class _Fault:
    kind: str
    status: int
    remaining: int
    watch: bool | None  # only watches, only lists, or both


def status(code: int, reason: str, message: str) -> Obj:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}


def _status_response(code: int, reason: str, message: str) -> web.Response:
    return web.json_response(status(code, reason, message), status=code)


def _field(obj: Obj, path: str) -> Any:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def field_selector(text: str) -> Callable[[Obj], bool]:
    """``a.b=x,c!=y`` (``==`` too): the field-selector forms kube-apiserver accepts for every resource."""
    terms: list[tuple[str, str, bool]] = []
    for term in filter(None, text.split(",")):
        if "!=" in term:
            path, value = term.split("!=", 1)
            terms.append((path, value, False))
        elif "=" in term:
            path, value = term.replace("==", "=", 1).split("=", 1)
            terms.append((path, value, True))
        else:
            raise ValueError(f"invalid field selector term {term!r}")
    return lambda obj: all((str(_field(obj, p) or "") == v) == eq for p, v, eq in terms)


def label_selector(text: str) -> Callable[[Obj], bool]:
    """``k=v``, ``k==v``, ``k!=v``, ``k``, ``!k``, comma-separated (all must hold)."""
    terms: list[tuple[str, str, str | None]] = []  # (operator, key, value)
    for term in filter(None, (t.strip() for t in text.split(","))):
        if "!=" in term:
            k, v = term.split("!=", 1)
            terms.append(("!=", k, v))
        elif "=" in term:
            k, v = term.replace("==", "=", 1).split("=", 1)
            terms.append(("=", k, v))
        elif term.startswith("!"):
            terms.append(("!", term[1:], None))
        elif " " not in term and "(" not in term:
            terms.append(("exists", term, None))
        else:
            raise ValueError(f"unsupported label selector term {term!r}")

    def holds(labels: Mapping[str, str], op: str, key: str, value: str | None) -> bool:
        if op == "=":
            return labels.get(key) == value
        if op == "!=":
            return labels.get(key) != value
        return (key in labels) == (op == "exists")

    return lambda obj: all(holds(_field(obj, "metadata.labels") or {}, *term) for term in terms)


class FakeApiServer:
    """Serves ``resources`` on 127.0.0.1 (an ephemeral port), plain HTTP or TLS with its own CA."""

    def __init__(
        self,
        resources: Iterable[FakeResource] = DEFAULT_RESOURCES,
        *,
        token: str | None = None,
        tls: bool = False,
        history_limit: int | None = None,
        bookmark_interval: float | None = None,
    ) -> None:
        self.resources = {r.kind: r for r in resources}
        self.token = token
        self.history_limit = history_limit
        self.bookmark_interval = bookmark_interval
        self.requests: list[RequestRecord] = []
        self._rv = 100
        self._compacted = self._rv  # watches from a version older than this get 410 Gone
        self._objects: dict[FakeResource, dict[tuple[str, str], Obj]] = {r: {} for r in self.resources.values()}
        self._history: list[tuple[int, FakeResource, Obj]] = []
        self._watchers: set[_Watcher] = set()
        self._missing: set[FakeResource] = set()
        self._faults: list[_Fault] = []
        self._snapshots: dict[str, tuple[int, list[Obj]]] = {}  # continue token id -> (version, items)
        self._tls_dir: tempfile.TemporaryDirectory[str] | None = tempfile.TemporaryDirectory() if tls else None
        self.ca_pem: bytes | None = None
        self._ssl: ssl.SSLContext | None = self._make_tls() if tls else None
        self._runner: web.AppRunner | None = None
        self._bookmarker: asyncio.Task[None] | None = None
        self.port = 0
        self.app = web.Application(middlewares=[self._middleware])
        self.app.router.add_get("/version", self._version)
        self.app.router.add_get("/api", self._api_versions)
        self.app.router.add_get("/apis", self._api_groups)
        self.app.router.add_get("/api/{version}", self._api_resources)
        self.app.router.add_get("/apis/{group}/{version}", self._api_resources)
        for prefix in ("/api/{version}", "/apis/{group}/{version}"):
            self.app.router.add_get(prefix + "/{plural}", self._collection)
            self.app.router.add_get(prefix + "/{plural}/{name}", self._object)
            self.app.router.add_get(prefix + "/namespaces/{namespace}/{plural}", self._collection)
            self.app.router.add_get(prefix + "/namespaces/{namespace}/{plural}/{name}", self._object)

    # -- lifecycle ---------------------------------------------------------------------------------------

    async def start(self) -> FakeApiServer:
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self._ssl).start()
        self.port = int(self._runner.addresses[0][1])
        if self.bookmark_interval:
            self._bookmarker = asyncio.create_task(self._bookmark_loop(self.bookmark_interval))
        return self

    async def close(self) -> None:
        if self._bookmarker is not None:
            self._bookmarker.cancel()
        for watcher in list(self._watchers):
            watcher.queue.put_nowait(None)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._tls_dir is not None:
            self._tls_dir.cleanup()

    async def __aenter__(self) -> FakeApiServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def url(self) -> str:
        return f"{'https' if self._ssl else 'http'}://127.0.0.1:{self.port}"

    @property
    def resource_version(self) -> int:
        return self._rv

    def write_kubeconfig(self, path: Path) -> Path:
        cluster: Obj = {"server": self.url}
        if self.ca_pem is not None:
            cluster["certificate-authority-data"] = base64.b64encode(self.ca_pem).decode()
        user: Obj = {"token": self.token} if self.token else {}
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": cluster}],
            "users": [{"name": "fake", "user": user}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
        }))
        return path

    def write_service_account(self, directory: Path, namespace: str = "istio-system") -> dict[str, str]:
        """The files a pod's service account mount holds; returns the environment a pod would have."""
        assert self.ca_pem is not None and self.token, "in-cluster config needs tls=True and a token"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "token").write_text(self.token)
        (directory / "ca.crt").write_bytes(self.ca_pem)
        (directory / "namespace").write_text(namespace)
        return {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(self.port)}

    # -- objects -----------------------------------------------------------------------------------------

    def resource(self, kind: str) -> FakeResource:
        try:
            return self.resources[kind]
        except KeyError:
            raise KeyError(f"the fake serves no kind {kind!r}") from None

    def _key(self, resource: FakeResource, obj: Obj) -> tuple[str, str]:
        meta = obj.setdefault("metadata", {})
        if resource.namespaced:
            meta.setdefault("namespace", "default")
        else:
            meta.pop("namespace", None)
        return str(meta.get("namespace") or ""), str(meta["name"])

    def create(self, obj: Obj) -> Obj:
        return self._write(obj, create=True)

    def update(self, obj: Obj) -> Obj:
        return self._write(obj, create=False)

    def apply(self, obj: Obj) -> Obj:
        return self._write(obj, create=None)

    def _write(self, obj: Obj, create: bool | None) -> Obj:
        resource = self.resource(obj["kind"])
        obj = copy.deepcopy(obj)
        obj["apiVersion"] = resource.api_version
        key = self._key(resource, obj)
        existing = self._objects[resource].get(key)
        if create is True and existing is not None:
            raise ValueError(f"{resource.kind} {key} already exists")
        if create is False and existing is None:
            raise KeyError(f"{resource.kind} {key} does not exist")
        meta = obj["metadata"]
        if existing is not None:
            meta["uid"] = existing["metadata"]["uid"]
            meta["creationTimestamp"] = existing["metadata"]["creationTimestamp"]
        else:
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", _now())
        self._rv += 1
        meta["resourceVersion"] = str(self._rv)
        meta["managedFields"] = [{"manager": "kube-fake", "operation": "Update", "apiVersion": resource.api_version}]
        self._objects[resource][key] = obj
        self._publish(resource, "ADDED" if existing is None else "MODIFIED", obj)
        return copy.deepcopy(obj)

    def delete(self, kind: str, name: str, namespace: str | None = None) -> Obj:
        resource = self.resource(kind)
        key = (namespace or "default", name) if resource.namespaced else ("", name)
        obj = self._objects[resource].pop(key)
        self._rv += 1
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(self._rv)
        self._publish(resource, "DELETED", obj)
        return obj

    def get(self, kind: str, name: str, namespace: str | None = None) -> Obj | None:
        resource = self.resource(kind)
        key = (namespace or "default", name) if resource.namespaced else ("", name)
        obj = self._objects[resource].get(key)
        return copy.deepcopy(obj) if obj is not None else None

    def objects(self, kind: str) -> list[Obj]:
        return [copy.deepcopy(o) for o in self._objects[self.resource(kind)].values()]

    def _publish(self, resource: FakeResource, kind: str, obj: Obj) -> None:
        event = {"type": kind, "object": obj}
        self._history.append((self._rv, resource, event))
        if self.history_limit is not None and len(self._history) > self.history_limit:
            dropped = self._history[: len(self._history) - self.history_limit]
            del self._history[: len(dropped)]
            self._compacted = dropped[-1][0]
        for watcher in self._watchers:
            if watcher.resource == resource and self._visible(watcher, obj):
                watcher.queue.put_nowait(event)

    @staticmethod
    def _visible(watcher: _Watcher, obj: Obj) -> bool:
        namespace = obj["metadata"].get("namespace")
        return (watcher.namespace is None or namespace == watcher.namespace) and watcher.matches(obj)

    # -- test controls -----------------------------------------------------------------------------------

    def compact(self) -> None:
        """Forget all history, as etcd compaction does: a watch from any earlier version gets 410 Gone."""
        self._history.clear()
        self._compacted = self._rv
        self._snapshots.clear()

    def drop_watches(self) -> int:
        """Abort every watch connection (the client sees the stream cut mid-response)."""
        for watcher in self._watchers:
            transport = watcher.request.transport
            if transport is not None:
                transport.abort()
            watcher.queue.put_nowait(None)
        return len(self._watchers)

    def bookmark(self) -> int:
        """Send a BOOKMARK at the current version to every watch that allowed bookmarks."""
        sent = 0
        for watcher in self._watchers:
            if watcher.bookmarks:
                resource = watcher.resource
                watcher.queue.put_nowait({"type": "BOOKMARK", "object": {
                    "kind": resource.kind, "apiVersion": resource.api_version,
                    "metadata": {"resourceVersion": str(self._rv)}}})
                sent += 1
        return sent

    def set_missing(self, kind: str, missing: bool = True) -> None:
        """Serve 404 for ``kind`` (as for a CRD that is not installed); ends its current watches."""
        resource = self.resource(kind)
        if missing:
            self._missing.add(resource)
            for watcher in self._watchers:
                if watcher.resource == resource:
                    watcher.queue.put_nowait(None)
        else:
            self._missing.discard(resource)

    def fail(self, kind: str, code: int, times: int = 1, *, watch: bool | None = None) -> None:
        """The next ``times`` requests for ``kind`` (only watches, only lists, or both) answer ``code``."""
        self._faults.append(_Fault(self.resource(kind).kind, code, times, watch))

    def watchers(self, kind: str | None = None) -> int:
        return sum(1 for w in self._watchers if kind is None or w.resource.kind == kind)

    def watch_requests(self, kind: str) -> list[RequestRecord]:
        resource = self.resource(kind)
        return [r for r in self.requests if r.watch and r.path.endswith("/" + resource.plural)
                and (r.path.startswith(f"/apis/{resource.group}/") if resource.group else r.path.startswith("/api/"))]

    # -- HTTP --------------------------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
        self.requests.append(RequestRecord(request.method, request.path, dict(request.query), time.monotonic()))
        if self.token is not None and request.headers.get("Authorization") != f"Bearer {self.token}":
            return _status_response(401, "Unauthorized", "Unauthorized")
        response: web.StreamResponse = await handler(request)
        return response

    async def _version(self, request: web.Request) -> web.Response:
        return web.json_response({"major": "1", "minor": "31", "gitVersion": "v1.31.0-fake", "platform": "linux/amd64"})

    async def _api_versions(self, request: web.Request) -> web.Response:
        return web.json_response({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []})

    async def _api_groups(self, request: web.Request) -> web.Response:
        groups: dict[str, set[str]] = {}
        for r in self._served():
            if r.group:
                groups.setdefault(r.group, set()).add(r.version)
        return web.json_response({"kind": "APIGroupList", "apiVersion": "v1", "groups": [
            {"name": g, "versions": [{"groupVersion": f"{g}/{v}", "version": v} for v in sorted(vs)],
             "preferredVersion": {"groupVersion": f"{g}/{max(vs)}", "version": max(vs)}}
            for g, vs in sorted(groups.items())]})

    async def _api_resources(self, request: web.Request) -> web.Response:
        group, version = request.match_info.get("group", ""), request.match_info["version"]
        served = [r for r in self._served() if r.group == group and r.version == version]
        if not served:
            return _status_response(404, "NotFound", "the server could not find the requested resource")
        return web.json_response({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": served[0].api_version,
                                  "resources": [{"name": r.plural, "kind": r.kind, "namespaced": r.namespaced,
                                                 "verbs": ["get", "list", "watch"]} for r in served]})

    def _served(self) -> list[FakeResource]:
        return [r for r in self.resources.values() if r not in self._missing]

    def _lookup(self, request: web.Request) -> FakeResource | None:
        group, version = request.match_info.get("group", ""), request.match_info["version"]
        plural = request.match_info["plural"]
        for r in self.resources.values():
            if (r.group, r.version, r.plural) == (group, version, plural) and r not in self._missing:
                if "namespace" in request.match_info and not r.namespaced:
                    return None
                return r
        return None

    def _fault(self, resource: FakeResource, watch: bool) -> web.Response | None:
        for fault in self._faults:
            if fault.kind == resource.kind and fault.remaining > 0 and fault.watch in (None, watch):
                fault.remaining -= 1
                reason = {410: "Expired", 404: "NotFound", 403: "Forbidden", 429: "TooManyRequests"}.get(
                    fault.status, "InternalError")
                return _status_response(fault.status, reason, f"injected fault {fault.status}")
        return None

    async def _object(self, request: web.Request) -> web.Response:
        resource = self._lookup(request)
        if resource is None:
            return _status_response(404, "NotFound", "the server could not find the requested resource")
        namespace = request.match_info.get("namespace", "")
        if resource.namespaced and not namespace:
            return _status_response(404, "NotFound", "the server could not find the requested resource")
        fault = self._fault(resource, False)  # a GET of one object fails like a list
        if fault is not None:
            return fault
        obj = self._objects[resource].get((namespace, request.match_info["name"]))
        if obj is None:
            return _status_response(404, "NotFound",
                                    f'{resource.plural} "{request.match_info["name"]}" not found')
        return web.json_response(obj)

    async def _collection(self, request: web.Request) -> web.StreamResponse:
        resource = self._lookup(request)
        if resource is None:
            return _status_response(404, "NotFound", "the server could not find the requested resource")
        watch = request.query.get("watch") in ("true", "1")
        fault = self._fault(resource, watch)
        if fault is not None:
            return fault
        try:
            matches = _selectors(request)
        except ValueError as e:
            return _status_response(400, "BadRequest", str(e))
        namespace = request.match_info.get("namespace")
        if watch:
            return await self._watch(request, resource, namespace, matches)
        return self._list(request, resource, namespace, matches)

    def _list(self, request: web.Request, resource: FakeResource, namespace: str | None,
              matches: Callable[[Obj], bool]) -> web.Response:
        token = request.query.get("continue")
        if token:
            snapshot_id, _, offset_text = token.partition(":")
            if snapshot_id not in self._snapshots:
                return _status_response(410, "Expired", "The provided continue parameter is too old to display a "
                                                        "consistent list result.")
            version, items = self._snapshots[snapshot_id]
            offset = int(offset_text)
        else:
            version, offset = self._rv, 0
            items = [_item(o) for o in self._objects[resource].values()
                     if (namespace is None or o["metadata"].get("namespace") == namespace) and matches(o)]
            items.sort(key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"]))
        limit = int(request.query.get("limit") or 0)
        meta: Obj = {"resourceVersion": str(version)}
        page = items[offset:]
        if limit and len(page) > limit:
            page = page[:limit]
            snapshot_id = token.partition(":")[0] if token else uuid.uuid4().hex
            self._snapshots[snapshot_id] = (version, items)
            meta["continue"] = f"{snapshot_id}:{offset + limit}"
            meta["remainingItemCount"] = len(items) - offset - limit
        elif token:
            self._snapshots.pop(token.partition(":")[0], None)
        return web.json_response({"kind": f"{resource.kind}List", "apiVersion": resource.api_version,
                                  "metadata": meta, "items": page})

    async def _watch(self, request: web.Request, resource: FakeResource, namespace: str | None,
                     matches: Callable[[Obj], bool]) -> web.StreamResponse:
        since_text = request.query.get("resourceVersion", "")
        if since_text not in ("", "0") and not since_text.isdigit():
            return _status_response(400, "BadRequest", f"invalid resourceVersion {since_text!r}")
        timeout = float(request.query.get("timeoutSeconds") or 1800)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        watcher = _Watcher(resource, namespace, matches, request.query.get("allowWatchBookmarks") == "true", request)
        # From here to the registration nothing awaits, so no event can fall between replay and live.
        initial: list[Obj]
        if since_text in ("", "0"):
            initial = [{"type": "ADDED", "object": o} for o in self._objects[resource].values()
                       if self._visible(watcher, o)]
        elif int(since_text) < self._compacted:
            initial = [{"type": "ERROR", "object": status(
                410, "Expired", f"too old resource version: {since_text} ({self._compacted})")}]
        else:
            since = int(since_text)
            initial = [event for version, r, event in self._history
                       if version > since and r == resource and self._visible(watcher, event["object"])]
        gone = bool(initial) and initial[0]["type"] == "ERROR"
        if not gone:
            self._watchers.add(watcher)
        try:
            async with asyncio.timeout(timeout):
                for event in initial:
                    await response.write(_line(event))
                while not gone:
                    live = await watcher.queue.get()
                    if live is None:  # dropped: the transport is (being) aborted; end without a last chunk
                        if request.transport is not None:
                            request.transport.abort()
                        return response
                    await response.write(_line(live))
        except TimeoutError:
            pass  # timeoutSeconds: the server ends the watch cleanly
        except (ConnectionError, RuntimeError):
            return response  # the client went away
        finally:
            self._watchers.discard(watcher)
        with contextlib.suppress(ConnectionError, RuntimeError):
            await response.write_eof()
        return response

    async def _bookmark_loop(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.bookmark()

    # -- TLS ---------------------------------------------------------------------------------------------

    def _make_tls(self) -> ssl.SSLContext:
        """A CA and a server certificate for 127.0.0.1, written where the SSL context can load them."""
        assert self._tls_dir is not None
        now = datetime.datetime.now(datetime.UTC)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-fake-ca")])
        ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
                   .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - _MINUTES_5).not_valid_after(now + _DAY)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                content_commitment=False, key_encipherment=False,
                                                data_encipherment=False, key_agreement=False, encipher_only=False,
                                                decipher_only=False), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
                   .sign(ca_key, hashes.SHA256()))
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
                .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - _MINUTES_5).not_valid_after(now + _DAY)
                .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                            x509.DNSName("localhost")]), critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
                .sign(ca_key, hashes.SHA256()))
        self.ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
        directory = Path(self._tls_dir.name)
        (directory / "server.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (directory / "server.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(directory / "server.crt", directory / "server.key")
        return context


def _selectors(request: web.Request) -> Callable[[Obj], bool]:
    checks = []
    if request.query.get("fieldSelector"):
        checks.append(field_selector(request.query["fieldSelector"]))
    if request.query.get("labelSelector"):
        checks.append(label_selector(request.query["labelSelector"]))
    return lambda obj: all(check(obj) for check in checks)


def _item(obj: Obj) -> Obj:
    """A list item: kube-apiserver leaves ``kind`` and ``apiVersion`` out of them."""
    return {k: v for k, v in obj.items() if k not in ("kind", "apiVersion")}


def _line(event: Obj) -> bytes:
    return json.dumps(event, separators=(",", ":")).encode() + b"\n"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- objects for tests -----------------------------------------------------------------------------------


def namespace(name: str, labels: Mapping[str, str] | None = None) -> Obj:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": dict(labels or {})}}


def pod(name: str, namespace: str = "default", *, ip: str | None = None, node: str = "node-a",
        labels: Mapping[str, str] | None = None, service_account: str = "default", phase: str = "Running") -> Obj:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": dict(labels or {})},
            "spec": {"nodeName": node, "serviceAccountName": service_account,
                     "containers": [{"name": "app", "image": "app:1"}]},
            "status": {"phase": phase, **({"podIP": ip, "podIPs": [{"ip": ip}]} if ip else {})}}


def service(name: str, namespace: str = "default", *, selector: Mapping[str, str] | None = None,
            cluster_ip: str = "10.96.0.10", port: int = 80) -> Obj:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace},
            "spec": {"clusterIP": cluster_ip, "selector": dict(selector or {}),
                     "ports": [{"port": port, "protocol": "TCP"}]}}


def authorization_policy(name: str, namespace: str = "default", spec: Obj | None = None) -> Obj:
    return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec if spec is not None else {}}


def peer_authentication(name: str, namespace: str = "default", mode: str = "STRICT") -> Obj:
    return {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
            "metadata": {"name": name, "namespace": namespace}, "spec": {"mtls": {"mode": mode}}}


async def eventually(predicate: Callable[[], object], what: str, within: float = 3.0) -> None:
    """Wait (bounded) until ``predicate()`` is true, polling every 10 ms; fails naming ``what``."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.01)
