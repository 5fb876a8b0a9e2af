"""The Kubernetes source of the agent's workload store: informers in, ``store.replace(build_state(...))`` out.

Every change marks the state dirty; one rebuild follows ``debounce`` seconds after the first change of a burst,
so a rollout of a hundred pods costs a rebuild or two, not a hundred; a state equal to the store's (a pod's
status heartbeat) is not handed over at all. Nothing is written to the store before
every informer has listed once: a store with pods but not yet their namespaces would compute enrollment wrong
and make the agent let go of enrolled pods.

One object the store cannot take (labels that are not strings, two running pods claiming one IP) is logged
naming it and left out; the rest of the cluster still gets through.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from agent.kube.client import SERVICE_ACCOUNT, Connection, connect
from agent.kube.informer import (
    DEFAULT_BACKOFF,
    PODS,
    RESOURCES,
    Backoff,
    Delta,
    Informer,
    KubeObject,
    Resource,
    describe,
    object_key,
)
from agent.state import WorkloadStore, build_state

log = logging.getLogger(__name__)

_Check = tuple[str | None, str | None]  # (why build_state rejects the object, its workload's IP)


class KubeSource:
    """Feeds a ``WorkloadStore`` from the API server; ``await run()`` until ``close()``."""

    def __init__(
        self,
        connection: Connection,
        store: WorkloadStore,
        *,
        resources: Sequence[Resource] = RESOURCES,
        resync: float | None = 300.0,
        debounce: float = 0.05,
        backoff: Backoff = DEFAULT_BACKOFF,
        watch_timeout: float = 300.0,
        pod_field_selector: str | None = None,
    ) -> None:
        """``pod_field_selector`` narrows the pods watched (e.g. ``spec.nodeName=<node>``); by default all pods
        are, since the agent needs remote workloads' addresses and identities too."""
        self.connection = connection
        self.store = store
        self.debounce = debounce
        self.informers: dict[Resource, Informer] = {
            resource: Informer(connection.api, resource, resync=resync, backoff=backoff, watch_timeout=watch_timeout,
                               field_selector=pod_field_selector if resource == PODS else None)
            for resource in resources}
        for informer in self.informers.values():
            informer.add_handler(self._changed)
        self.synced = asyncio.Event()  # set once every informer has listed and the store holds that state
        self.rebuilds = 0  # states built
        self.replacements = 0  # states handed to the store (the built state differed)
        self._build_seconds = 0.0
        self._checks: dict[tuple[str, str, str], _Check] = {}
        self._dirty = asyncio.Event()
        self._closed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._reported: set[str] = set()  # invalid objects already logged (object, version, problem)

    @classmethod
    async def from_config(
        cls,
        kubeconfig: Path | None,
        store: WorkloadStore,
        *,
        context: str | None = None,
        service_account: Path = SERVICE_ACCOUNT,
        environ: Mapping[str, str] | None = None,
        **options: Any,
    ) -> KubeSource:
        """A source for ``kubeconfig``, or in-cluster config (or the default kubeconfig) when it is None.

        Raises ``KubeConfigError`` when there is no usable configuration; ``options`` go to ``__init__``.
        """
        connection = await connect(kubeconfig, context=context, service_account=service_account, environ=environ)
        return cls(connection, store, **options)

    def objects(self) -> list[KubeObject]:
        """Every cached object of every resource."""
        return [obj for informer in self.informers.values() for obj in informer.cache.values()]

    async def run(self) -> None:
        """Run the informers and the rebuild loop; returns after ``close()`` (or raises when cancelled)."""
        if self._closed.is_set():
            raise RuntimeError("KubeSource is closed")
        self._tasks = [asyncio.create_task(informer.run(), name=f"informer {resource}")
                       for resource, informer in self.informers.items()]
        self._tasks.append(asyncio.create_task(self._rebuild_loop(), name="kubernetes state rebuild"))
        try:
            await self._closed.wait()
        finally:
            await self._stop_tasks()

    async def close(self) -> None:
        """Stop the informers and close the API connection."""
        self._closed.set()
        await self._stop_tasks()
        await self.connection.close()

    async def _stop_tasks(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _changed(self, delta: Delta) -> None:
        self._dirty.set()

    async def _rebuild_loop(self) -> None:
        waiting = dict(self.informers)
        while waiting:
            try:
                await asyncio.wait_for(asyncio.gather(*(i.synced.wait() for i in waiting.values())), timeout=30)
            except TimeoutError:
                log.warning("waiting for the first list of %s", ", ".join(str(r) for r in waiting))
            waiting = {r: i for r, i in waiting.items() if not i.synced.is_set()}
        self._dirty.clear()
        self._rebuild()
        self.synced.set()
        state = self.store.state
        log.info("Kubernetes state synced: %d namespaces, %d pods with addresses, %d other objects",
                 len(state.namespaces), len(state.workloads), len(state.objects))
        while True:
            await self._dirty.wait()
            # Let the rest of a burst arrive; and however busy the cluster, rebuild at most half the time.
            await asyncio.sleep(max(self.debounce, self._build_seconds))
            self._dirty.clear()
            try:
                self._rebuild()
            except Exception:
                log.exception("rebuilding the cluster state failed")

    def _rebuild(self) -> None:
        """Build the state from every cache; hand it to the store unless it equals what the store has.

        Most pod updates (conditions, container statuses) change nothing the store holds: the comparison
        spares the store's subscribers those.
        """
        started = time.monotonic()
        objects = self.objects()
        try:
            state = build_state(objects)
        except (ValueError, TypeError, AttributeError):
            try:
                state = build_state(self._valid(objects))
            except (ValueError, TypeError, AttributeError) as e:  # not expected: _valid checked each one
                log.error("cannot build the cluster state, keeping the previous one: %s", e)
                return
        self.rebuilds += 1
        if state != self.store.state:
            self.store.replace(state)
            self.replacements += 1
        self._build_seconds = time.monotonic() - started
        log.debug("rebuilt the cluster state from %d objects in %.1f ms", len(objects), self._build_seconds * 1000)

    def _valid(self, objects: Iterable[KubeObject]) -> list[KubeObject]:
        """The objects ``build_state`` accepts: each checked alone, and one pod per IP (the newest)."""
        kept: list[KubeObject] = []
        by_ip: dict[str, list[KubeObject]] = {}
        checks: dict[tuple[str, str, str], _Check] = {}
        for obj in objects:
            if obj.get("kind") not in ("Namespace", "Pod"):
                kept.append(obj)
                continue
            error, ip = check = self._check(obj)
            meta = obj["metadata"]
            checks[(str(obj["kind"]), object_key(obj), str(meta.get("resourceVersion")))] = check
            if error is not None:
                self._report(obj, error if error.startswith(_name(obj)) else f"{_name(obj)}: {error}")
            elif ip is not None:
                by_ip.setdefault(ip, []).append(obj)
            else:
                kept.append(obj)
        self._checks = checks  # what is no longer in the caches is forgotten
        for ip, pods in by_ip.items():
            pods.sort(key=_age_order)
            kept.append(pods[-1])
            for loser in pods[:-1]:
                self._report(loser, f"{_name(loser)}: status.podIP {ip} is also {_name(pods[-1])}'s, which is newer")
        return kept

    def _check(self, obj: KubeObject) -> _Check:
        """(the error ``build_state`` finds in ``obj`` alone, the address of the workload it makes); memoised
        per object version, so a lasting bad object does not make every rebuild check every pod again."""
        version = obj["metadata"].get("resourceVersion")
        key = (str(obj["kind"]), object_key(obj), str(version))
        if version and key in self._checks:
            return self._checks[key]
        try:
            alone = build_state([obj])
        except (ValueError, TypeError, AttributeError) as e:
            return str(e), None
        return None, next(iter(alone.workloads), None)

    def _report(self, obj: KubeObject, message: str) -> None:
        meta = obj.get("metadata") or {}
        key = f"{message}@{meta.get('resourceVersion')}"
        if key not in self._reported:
            if len(self._reported) > 10_000:
                self._reported.clear()
            self._reported.add(key)
            log.warning("skipping %s", message)


def _name(obj: KubeObject) -> str:
    return describe(Resource("", "", "", str(obj.get("kind"))), obj)


def _age_order(pod: KubeObject) -> tuple[str, int]:
    """Creation time (RFC 3339 in UTC sorts as text), then resourceVersion when it is numeric (as etcd's are)."""
    meta = pod.get("metadata") or {}
    version = str(meta.get("resourceVersion") or "")
    return str(meta.get("creationTimestamp") or ""), int(version) if version.isdigit() else 0

