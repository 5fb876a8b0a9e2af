"""The Kubernetes source of the agent's mesh store: informer deltas in, ``MeshStore.apply`` out.

Deltas are batched: the first change of a burst is applied ``debounce`` seconds later together with the rest
of the burst, so a rollout of a hundred pods costs a few store updates, and each costs only what changed
(a pod's status heartbeat, equal to what the store holds, costs a comparison). Nothing is written to the
store before every informer has listed once: a store with pods but not yet their namespaces would compute
enrollment wrong and make the agent let go of enrolled pods.

One object the store cannot take (labels that are not strings, a malformed port) is logged naming it and
left out; the rest of the cluster still gets through.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from agent.kube.client import SERVICE_ACCOUNT, Connection, connect
from agent.kube.informer import (
    DEFAULT_BACKOFF,
    PODS,
    RESOURCES,
    Delta,
    Informer,
    KubeObject,
    Resource,
)
from agent.mesh.convert import identify
from agent.mesh.store import Key, MeshStore, ObjectError
from agent.retry import Backoff

log = logging.getLogger(__name__)
APPLY_CHUNK = 4  # objects per store update while catching up with a burst


class KubeSource:
    """Feeds a ``MeshStore`` from the API server; ``await run()`` until ``close()``."""

    def __init__(
        self,
        connection: Connection,
        store: MeshStore,
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
        self.updates = 0  # batches handed to the store
        self._apply_seconds = 0.0
        self._pending: dict[Key, KubeObject | None] = {}  # the latest event of each object since the last apply
        self._dirty = asyncio.Event()
        self._closed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._reported: set[str] = set()  # problems already logged

    @classmethod
    async def from_config(
        cls,
        kubeconfig: Path | None,
        store: MeshStore,
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
        """Run the informers and the update loop; returns after ``close()`` (or raises when cancelled)."""
        if self._closed.is_set():
            raise RuntimeError("KubeSource is closed")
        self._tasks = [asyncio.create_task(informer.run(), name=f"informer {resource}")
                       for resource, informer in self.informers.items()]
        self._tasks.append(asyncio.create_task(self._apply_loop(), name="kubernetes state updates"))
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
        obj = delta.obj if delta.obj.get("kind") else {**delta.obj, "kind": delta.resource.kind}
        try:
            key: Key = identify(obj)  # the store's own key, so that a delete finds what an add put there
        except ObjectError as e:
            self._report([e])
            return
        if delta.type == "DELETED":
            self._pending[key] = None
        else:
            self._pending[key] = obj
        self._dirty.set()

    async def _apply_loop(self) -> None:
        waiting = dict(self.informers)
        while waiting:
            try:
                await asyncio.wait_for(asyncio.gather(*(i.synced.wait() for i in waiting.values())), timeout=30)
            except TimeoutError:
                log.warning("waiting for the first list of %s", ", ".join(str(r) for r in waiting))
            waiting = {r: i for r, i in waiting.items() if not i.synced.is_set()}
        self._dirty.clear()
        self._pending.clear()
        self._report(self.store.replace_all(self.objects()))
        self.updates += 1
        self.synced.set()
        state = self.store.state
        log.info("Kubernetes state synced: %d namespaces, %d pods with addresses, %d services, %d other objects",
                 len(state.namespaces), len(state.by_uid), len(state.services), len(state.objects))
        while True:
            await self._dirty.wait()
            # Let the rest of a burst arrive; and however busy the cluster, update at most half the time.
            await asyncio.sleep(max(self.debounce, self._apply_seconds))
            self._dirty.clear()
            try:
                await self._apply_pending()
            except Exception:
                log.exception("updating the mesh state failed")

    async def _apply_pending(self) -> None:
        """Apply what is pending a few objects at a time, letting traffic through in between: each apply is one
        consistent snapshot, and none holds the event loop long (bench/store.py: ~1 ms for 4 objects, ~2 ms for a
        50 ms burst at 200 events/s in one go)."""
        pending, self._pending = self._pending, {}
        started = time.monotonic()
        items = list(pending.items())
        for at in range(0, len(items), APPLY_CHUNK):
            chunk = items[at:at + APPLY_CHUNK]
            self._report(self.store.apply([obj for _k, obj in chunk if obj is not None],
                                          [key for key, obj in chunk if obj is None]))
            await asyncio.sleep(0)
        self.updates += 1
        self._apply_seconds = time.monotonic() - started
        log.debug("applied %d changes in %.2f ms", len(pending), self._apply_seconds * 1000)

    def _report(self, errors: Sequence[ObjectError]) -> None:
        for error in errors:
            message = str(error)
            if message not in self._reported:
                if len(self._reported) > 10_000:
                    self._reported.clear()
                self._reported.add(message)
                log.warning("skipping %s", message)
