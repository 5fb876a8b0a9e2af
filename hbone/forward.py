"""A plaintext listener whose every connection is tunnelled over HBONE to one fixed target.

This is the outbound half of the mesh with the destination fixed up front (the agent's outbound proxy
learns it from the captured socket instead): used by ``python -m hbone forward``, the demo, the
benchmarks and the tests.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from hbone.accept import Acceptor
from hbone.addresses import Address, canonical_address
from hbone.authority import Authority
from hbone.client import HboneError, request_headers
from hbone.identity import SpiffeId, WorkloadCertificate
from hbone.pool import Pool
from hbone.relay import Relay
from hbone.sockets import close_with_reset, listener

log = logging.getLogger(__name__)



class Forwarder:
    def __init__(self, pool: Pool, cert: WorkloadCertificate, expected: SpiffeId, hbone: Address,
                 authority: Authority) -> None:
        self.pool, self.cert, self.expected = pool, cert, expected
        self.hbone, self.authority = hbone, authority
        self.failures = 0
        self._acceptor: Acceptor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> Address:
        self._loop = asyncio.get_running_loop()
        self._acceptor = Acceptor(listener(host, port), self._tunnel, "forwarder")
        self._acceptor.start()
        return self._acceptor.address

    async def _tunnel(self, sock: socket.socket) -> None:
        client = canonical_address(sock.getpeername())
        relay = Relay()
        relay.preload_from(sock)
        try:
            await self.pool.connect(relay, self.cert, self.expected, self.hbone, self.authority,
                                    request_headers(client))
        except HboneError as e:
            self.failures += 1
            log.warning("tunnel %s -> %s via %s failed: %s", client, self.authority, self.hbone, e)
            close_with_reset(sock)
            return
        assert self._loop is not None  # set by start, which made the acceptor calling this
        await self._loop.connect_accepted_socket(lambda: relay, sock)

    async def close(self) -> None:
        if self._acceptor is not None:
            await self._acceptor.close()
