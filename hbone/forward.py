"""A plaintext listener whose every connection is tunnelled over HBONE to one fixed target.

This is the outbound half of the mesh with the destination fixed up front (the agent's outbound proxy
learns it from the captured socket instead): used by ``python -m hbone forward``, the demo, the
benchmarks and the tests.
"""

from __future__ import annotations

import asyncio
import logging

from hbone.client import HboneError, request_headers
from hbone.identity import SpiffeId, WorkloadCertificate
from hbone.pool import Pool
from hbone.protocol import Authority
from hbone.relay import AcceptedRelay, abort_with_reset

log = logging.getLogger(__name__)

Address = tuple[str, int]


class Forwarder:
    def __init__(self, pool: Pool, cert: WorkloadCertificate, expected: SpiffeId, hbone: Address,
                 authority: Authority) -> None:
        self.pool, self.cert, self.expected = pool, cert, expected
        self.hbone, self.authority = hbone, authority
        self.failures = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> Address:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: AcceptedRelay(self._accepted), host, port, backlog=1024)
        name = self._server.sockets[0].getsockname()
        return name[0], name[1]

    def _accepted(self, relay: AcceptedRelay) -> None:
        task = asyncio.ensure_future(self._tunnel(relay))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _tunnel(self, relay: AcceptedRelay) -> None:
        assert relay.transport is not None
        client = relay.transport.get_extra_info("peername")[:2]
        try:
            await self.pool.connect(relay, self.cert, self.expected, self.hbone, self.authority,
                                    request_headers(client))
        except HboneError as e:
            self.failures += 1
            log.warning("tunnel %s -> %s via %s failed: %s", client, self.authority, self.hbone, e)
            abort_with_reset(relay.transport)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
