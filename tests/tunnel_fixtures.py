"""A real HBONE path on loopback for tests: upstream TCP server <- HboneServer <- Forwarder <- client."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from agent.ca.authority import CertificateAuthority
from hbone.authority import Authority
from hbone.forward import Forwarder
from hbone.identity import SpiffeId, WorkloadCertificate
from hbone.pool import Pool
from hbone.server import HboneServer, PolicyHook, fixed_certificate

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo until EOF, then half-close back."""
    while data := await reader.read(1 << 20):
        writer.write(data)
        await writer.drain()
    writer.write_eof()
    await writer.drain()
    writer.close()


@dataclass
class Path:
    server: HboneServer
    pool: Pool
    forwarder: Forwarder
    entry: tuple[str, int]  # where a client connects (the forwarder)
    upstream: tuple[str, int]

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(*self.entry, limit=1 << 22)


@contextlib.asynccontextmanager
async def hbone_path(ca: CertificateAuthority, client: WorkloadCertificate, server: WorkloadCertificate,
                     handler: Handler = echo, *, expect: SpiffeId | None = None, policy: PolicyHook | None = None,
                     upstream_port: int | None = None, **pool_args: float) -> AsyncIterator[Path]:
    upstream = await asyncio.start_server(handler, "127.0.0.1", 0)
    up_addr = upstream.sockets[0].getsockname()[:2]
    if upstream_port is not None:
        up_addr = ("127.0.0.1", upstream_port)
    hbone = HboneServer(fixed_certificate(server), ca.trust_bundle, policy=policy, connect_timeout=2.0)
    await hbone.start("127.0.0.1", 0)
    pool = Pool(ca.trust_bundle, **pool_args)  # type: ignore[arg-type]
    fwd = Forwarder(pool, client, expect or server.identity, hbone.address, Authority(*up_addr))
    entry = await fwd.start()
    try:
        yield Path(hbone, pool, fwd, entry, up_addr)
    finally:
        await fwd.close()
        await pool.close()
        await hbone.close()
        upstream.close()
