"""Informers: a local cache of one Kubernetes resource kept current by LIST + WATCH, as client-go's reflector.

The protocol, which this module speaks itself over the client's authenticated HTTP requests (agent/kube/client.py):

- LIST (paged with ``limit``/``continue``) gives the items and the collection's ``metadata.resourceVersion``;
  the cache is replaced by the items, and the differences are delivered to the handlers as deltas.
- WATCH from that resourceVersion (``allowWatchBookmarks=true``, a randomised ``timeoutSeconds``) streams
  newline-delimited JSON events; ADDED/MODIFIED/DELETED are applied to the cache and delivered, BOOKMARK only
  advances the resourceVersion, so that the next watch starts from a version the server still remembers.
- 410 Gone (as the HTTP status, or as an ERROR event whose Status has code 410): the version was compacted
  away, so events were lost: LIST again; the diff against the cache delivers what changed in the gap,
  deletions included.
- A watch that ends (server timeout) is re-opened at once from the last version; a dropped connection or an
  error is retried after an exponential back-off with jitter, capped at 30 s.
- A resource that is not served (404: a CustomResourceDefinition not installed) counts as an empty, synced
  collection, since nothing of that kind can exist; it is logged and listed again with back-off.
- Every ``resync`` seconds the whole cache is re-delivered to the handlers (RESYNC deltas), as client-go's
  resync period does: a safety net for consumers, not a poll of the server.

Objects are plain dicts, exactly as the API server sent them (list items get the ``kind``/``apiVersion`` the
server leaves out of them; ``metadata.managedFields`` is dropped to save memory). They are replaced, never
changed in place, so consumers may keep references to them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from agent.http import HttpError, Response, Timeouts
from agent.kube.client import KubeClient, KubeConfigError
from agent.retry import Backoff

log = logging.getLogger(__name__)

KubeObject = dict[str, Any]
DeltaType = Literal["ADDED", "MODIFIED", "DELETED", "RESYNC"]


@dataclass(frozen=True, slots=True)
class Resource:
    """A listable collection of the API: ``/api/v1/pods``, ``/apis/security.istio.io/v1/...``."""

    group: str  # "" for the core group
    version: str
    plural: str
    kind: str
    crd: bool = False  # served by a CustomResourceDefinition, which may not be installed

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def path(self) -> str:
        if self.group:
            return f"/apis/{self.group}/{self.version}/{self.plural}"
        return f"/api/{self.version}/{self.plural}"

    def __str__(self) -> str:
        return f"{self.api_version} {self.plural}"


NAMESPACES = Resource("", "v1", "namespaces", "Namespace")
PODS = Resource("", "v1", "pods", "Pod")
SERVICES = Resource("", "v1", "services", "Service")
ENDPOINT_SLICES = Resource("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice")
NODES = Resource("", "v1", "nodes", "Node")  # topology.kubernetes.io/zone, for Services' traffic distribution
AUTHORIZATION_POLICIES = Resource("security.istio.io", "v1", "authorizationpolicies", "AuthorizationPolicy", crd=True)
PEER_AUTHENTICATIONS = Resource("security.istio.io", "v1", "peerauthentications", "PeerAuthentication", crd=True)
RESOURCES = (NAMESPACES, PODS, SERVICES, ENDPOINT_SLICES, NODES, AUTHORIZATION_POLICIES, PEER_AUTHENTICATIONS)


class ApiError(Exception):
    """The API server answered with an error Status (an HTTP error, or an ERROR watch event)."""

    def __init__(self, resource: Resource, code: int, reason: str, message: str, request: str = "") -> None:
        super().__init__(f"{resource}: {code} {reason}: {message}" + (f" ({request})" if request else ""))
        self.code, self.reason, self.message, self.request = code, reason, message, request

    @classmethod
    def from_status(cls, resource: Resource, status: Any, http_status: int = 0, request: str = "") -> ApiError:
        """From a Status object; ``request`` (``METHOD URL``) names the request it answered, for messages."""
        status = status if isinstance(status, dict) else {}
        code = status.get("code") if isinstance(status.get("code"), int) else http_status
        error = Gone if code == 410 else NotFound if code == 404 else ApiError
        return error(resource, code, str(status.get("reason") or ""), str(status.get("message") or ""), request)


class Gone(ApiError):
    """410: the resourceVersion (or list continue token) is older than the server's history."""


class NotFound(ApiError):
    """404: the resource is not served (for a custom resource: its CRD is not installed)."""


class ProtocolError(Exception):
    """The server sent something that is not the list/watch protocol (bad JSON, no resourceVersion...)."""


@dataclass(frozen=True, slots=True)
class Delta:
    """One change delivered to handlers; for DELETED, ``obj`` is the object's last known state."""

    type: DeltaType
    resource: Resource
    obj: KubeObject
    old: KubeObject | None = None  # the cached version a MODIFIED replaced


Handler = Callable[[Delta], None]


DEFAULT_BACKOFF = Backoff(initial=0.5, cap=30.0, jitter=0.25)  # between attempts to list or watch
# Watch events carry whole objects; there is no hard limit on their size, but etcd's default request limit is
# 1.5 MiB: a longer line is not an event the API server could have sent.
MAX_EVENT_LINE = 2**21


def object_key(obj: KubeObject) -> str:
    meta = obj["metadata"]
    namespace = meta.get("namespace")
    return f"{namespace}/{meta['name']}" if namespace else str(meta["name"])


def describe(resource: Resource, obj: Any) -> str:
    """``Pod ns/name`` for logs, as far as the object allows."""
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    if not isinstance(meta, dict):
        return f"{resource.kind} <no metadata>"
    name = f"{meta.get('namespace')}/{meta.get('name')}" if meta.get("namespace") else str(meta.get("name"))
    return f"{resource.kind} {name}"


class Informer:
    """LIST + WATCH one resource into ``cache`` (key ``namespace/name``, or ``name`` when cluster-scoped)."""

    def __init__(
        self,
        api: KubeClient,
        resource: Resource,
        *,
        field_selector: str | None = None,
        label_selector: str | None = None,
        resync: float | None = 300.0,
        backoff: Backoff = DEFAULT_BACKOFF,
        watch_timeout: float = 300.0,
        request_timeout: float = 60.0,
        page_size: int = 500,
    ) -> None:
        self.api = api
        self.resource = resource
        self.field_selector = field_selector
        self.label_selector = label_selector
        self.resync = resync
        self.backoff = backoff
        self.watch_timeout = watch_timeout
        self.request_timeout = request_timeout
        self.page_size = page_size
        self.cache: dict[str, KubeObject] = {}
        self.resource_version: str | None = None
        self.synced = asyncio.Event()  # set after the first successful LIST (or a 404 for a CRD)
        self._handlers: list[Handler] = []
        # Counters, for logs, metrics and tests.
        self.lists = 0
        self.watches = 0  # watch connections the server accepted
        self.bookmarks = 0
        self.relists_gone = 0
        self.resyncs = 0
        self.failures = 0  # consecutive failed attempts (the back-off exponent); 0 when healthy
        self.missing = False  # a CRD-backed resource the server does not serve (404)
        self._watch_events = 0  # events the current watch delivered

    def add_handler(self, handler: Handler) -> None:
        self._handlers.append(handler)

    async def run(self) -> None:
        """List and watch until cancelled; never returns and never raises on its own."""
        if self.resync:
            resync = asyncio.create_task(self._resync_loop(self.resync), name=f"resync {self.resource}")
        try:
            await self._reflect()
        finally:
            if self.resync:
                resync.cancel()
                await asyncio.gather(resync, return_exceptions=True)

    async def _reflect(self) -> None:
        relist, just_listed = True, False  # just_listed: no watch event since the last list
        while True:
            if self._watch_events:
                just_listed = False
            self._watch_events = 0
            try:
                if relist:
                    just_listed = False
                    await self._list()
                    relist = False
                    self.failures = 0
                    just_listed = True
                if await self._watch():
                    self.failures = 0
                    continue  # the server ended a healthy watch (timeoutSeconds): resume from where it was
                self.failures += 1  # a stream that closes at once without an event must not spin
                log.debug("%s: watch ended without events", self.resource)
            except Gone as e:
                during_list, relist = relist, True  # a list page's continue token can expire too
                self.relists_gone += 1
                log.info("%s: resourceVersion %s is too old (%s), relisting", self.resource, self.resource_version,
                         e.message or "410 Gone")
                if not during_list and (not just_listed or self._watch_events):
                    continue  # the normal case: relist at once; back off only if lists keep being "too old"
                self.failures += 1
            except NotFound as e:
                self.failures += 1
                relist = True
                if not self.resource.crd:
                    log.error("%s is not served by the API server (%s)", self.resource, e)
                else:
                    self._replace({}, None)  # nothing of a kind the cluster does not define can exist
                    if not self.missing:
                        log.warning("%s is not served: is the %s CRD installed? Treating it as empty; retrying "
                                    "with back-off", self.resource, f"{self.resource.plural}.{self.resource.group}")
                    self.missing = True
            except (ApiError, KubeConfigError) as e:  # KubeConfigError: no credential to be had (an exec plugin)
                self.failures += 1
                if isinstance(e, ApiError):  # its message names the resource
                    log.log(logging.ERROR if e.code in (401, 403) else logging.WARNING, "%s", e)
                else:
                    log.error("%s: %s", self.resource, e)
            except (HttpError, TimeoutError, OSError, ProtocolError) as e:
                self.failures += 1
                # A dropped watch is routine (API server restarts, load balancers); repeated failures are not.
                log.log(logging.INFO if self.failures == 1 else logging.WARNING,
                        "%s: request to the API server failed: %s", self.resource, str(e) or type(e).__name__)
            except Exception:
                self.failures += 1
                log.exception("%s: informer failed", self.resource)
            delay = self.backoff.delay(self.failures, random.random())
            log.debug("%s: retrying in %.2fs (failure %d)", self.resource, delay, self.failures)
            await asyncio.sleep(delay)

    async def _request(self, params: list[tuple[str, str]], timeouts: Timeouts) -> Response:
        if self.field_selector:
            params.append(("fieldSelector", self.field_selector))
        if self.label_selector:
            params.append(("labelSelector", self.label_selector))
        response = await self.api.request("GET", self.resource.path, params=params, timeouts=timeouts)
        if response.status != 200:
            async with response:
                body = await response.read(limit=MAX_EVENT_LINE)
            try:
                status = json.loads(body)
            except ValueError:
                status = {"reason": response.reason, "message": body[:200].decode(errors="replace")}
            raise ApiError.from_status(self.resource, status, response.status, response.request)
        return response

    async def _list(self) -> None:
        items: dict[str, KubeObject] = {}
        params_continue: str | None = None
        timeout = Timeouts(total=self.request_timeout)
        while True:
            params = [("limit", str(self.page_size))]
            if params_continue:
                params.append(("continue", params_continue))
            async with await self._request(params, timeout) as response:
                body = await response.read()
            try:
                page = json.loads(body)
            except ValueError as e:
                raise ProtocolError(f"{self.resource}: list response is not JSON: {e}") from None
            if not isinstance(page, dict) or not isinstance(page.get("items") or [], list):
                raise ProtocolError(f"{self.resource}: list response is not a {self.resource.kind}List")
            for item in page.get("items") or []:
                obj = self._admit(item)
                if obj is not None:
                    items[object_key(obj)] = obj
            meta: dict[str, Any] = page["metadata"] if isinstance(page.get("metadata"), dict) else {}
            params_continue = meta.get("continue") or None
            if not params_continue:
                version = meta.get("resourceVersion")
                break
        if not isinstance(version, str) or not version:
            raise ProtocolError(f"{self.resource}: list response has no metadata.resourceVersion")
        self.lists += 1
        if self.missing:
            log.info("%s is served now", self.resource)
            self.missing = False
        self._replace(items, version)
        log.debug("%s: listed %d at resourceVersion %s", self.resource, len(items), version)

    def _replace(self, items: dict[str, KubeObject], version: str | None) -> None:
        """Replace the cache with a fresh list, delivering the differences (as client-go's Replace)."""
        old, self.cache, self.resource_version = self.cache, items, version
        for key, obj in items.items():
            previous = old.get(key)
            if previous is None:
                self._deliver(Delta("ADDED", self.resource, obj))
            elif _version(previous) != _version(obj) or (_version(obj) is None and previous != obj):
                self._deliver(Delta("MODIFIED", self.resource, obj, previous))
        for key, obj in old.items():
            if key not in items:
                self._deliver(Delta("DELETED", self.resource, obj))
        self.synced.set()

    async def _watch(self) -> int:
        """One watch connection; returns the number of events it carried once the server ends it."""
        assert self.resource_version is not None
        timeout_seconds = max(1, int(self.watch_timeout * random.uniform(1.0, 2.0)))  # spread, as client-go
        params = [("watch", "true"), ("resourceVersion", self.resource_version), ("allowWatchBookmarks", "true"),
                  ("timeoutSeconds", str(timeout_seconds))]
        # No total timeout: a watch is long-lived. A read timeout past the server's own catches dead peers.
        timeout = Timeouts(connect=self.request_timeout, read=timeout_seconds + 30)
        async with await self._request(params, timeout) as response:
            self.watches += 1
            log.debug("%s: watching from resourceVersion %s", self.resource, self.resource_version)
            async for line in response.lines(MAX_EVENT_LINE):
                if not line.strip():
                    continue
                try:
                    event = json.loads(line)
                except ValueError as e:
                    raise ProtocolError(f"{self.resource}: watch event is not JSON: {e}") from None
                self._apply(event, response.request)
                self._watch_events += 1
                self.failures = 0  # the watch works: the next failure starts a new streak
        return self._watch_events

    def _apply(self, event: Any, request: str = "") -> None:
        if not isinstance(event, dict) or not isinstance(event.get("object"), dict):
            raise ProtocolError(f"{self.resource}: watch event without an object: {str(event)[:200]}")
        kind, obj = event.get("type"), event["object"]
        if kind == "ERROR":
            raise ApiError.from_status(self.resource, obj, request=request)
        version = _version(obj)
        if kind == "BOOKMARK":
            if version:
                self.resource_version = version
                self.bookmarks += 1
            return
        if kind not in ("ADDED", "MODIFIED", "DELETED"):
            log.warning("%s: ignoring watch event of unknown type %r", self.resource, kind)
            return
        admitted = self._admit(obj)
        if admitted is not None:
            key = object_key(admitted)
            if kind == "DELETED":
                self.cache.pop(key, None)
                self._deliver(Delta("DELETED", self.resource, admitted))  # the server sends the final state
            else:
                previous = self.cache.get(key)
                self.cache[key] = admitted
                if previous is None:
                    self._deliver(Delta("ADDED", self.resource, admitted))
                else:
                    self._deliver(Delta("MODIFIED", self.resource, admitted, previous))
        if version:
            self.resource_version = version

    def _admit(self, item: Any) -> KubeObject | None:
        """The object as cached, or None (logged) when it cannot be one of this resource's objects."""
        meta = item.get("metadata") if isinstance(item, dict) else None
        if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) or not meta["name"] or not isinstance(
                meta.get("namespace", ""), str):
            log.warning("%s: skipping an invalid object (%s): metadata.name (and namespace) must be strings",
                        self.resource, describe(self.resource, item))
            return None
        obj: KubeObject = item
        if "managedFields" in meta:
            meta = {k: v for k, v in meta.items() if k != "managedFields"}
            obj = {**obj, "metadata": meta}
        if "kind" not in obj or "apiVersion" not in obj:  # list items come without them
            obj = {"kind": self.resource.kind, "apiVersion": self.resource.api_version, **obj}
        return obj

    def _deliver(self, delta: Delta) -> None:
        for handler in self._handlers:
            try:
                handler(delta)
            except Exception:
                log.exception("%s: handler %r failed on %s %s", self.resource, handler, delta.type,
                              describe(self.resource, delta.obj))

    async def _resync_loop(self, period: float) -> None:
        while True:
            await asyncio.sleep(period)
            if self.synced.is_set():
                started = time.monotonic()
                for obj in list(self.cache.values()):
                    self._deliver(Delta("RESYNC", self.resource, obj))
                self.resyncs += 1
                log.debug("%s: resynced %d objects in %.1f ms", self.resource, len(self.cache),
                          (time.monotonic() - started) * 1000)


def _version(obj: KubeObject) -> str | None:
    meta = obj.get("metadata")
    version = meta.get("resourceVersion") if isinstance(meta, dict) else None
    return version if isinstance(version, str) and version else None
