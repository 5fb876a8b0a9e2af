"""HBONE over IPv6 on loopback (::1) with real TLS, and one dual-stack listener serving both families."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import socket
from collections.abc import AsyncIterator

import pytest

from agent.ca.authority import CertificateAuthority
from agent.proxy.inputs import forwarded_client
from hbone.authority import Authority
from hbone.forward import Forwarder
from hbone.identity import WorkloadCertificate
from hbone.pool import Pool
from hbone.server import HboneServer, InboundRequest, fixed_certificate
from hbone.sockets import IP_BIND_ADDRESS_NO_PORT, dial
from tests.fixtures.hbone_path import echo, hbone_path


async def test_bulk_byte_exact_over_ipv6(ca: CertificateAuthority, client_cert: WorkloadCertificate,
                                         server_cert: WorkloadCertificate) -> None:
    seen: list[InboundRequest] = []

    def record(request: InboundRequest) -> str | None:
        seen.append(request)
        return None

    async with hbone_path(ca, client_cert, server_cert, policy=record, host="::1") as path:
        payload = os.urandom(8 << 20)
        reader, writer = await path.open()
        writer.write(payload)
        writer.write_eof()
        back = await asyncio.wait_for(reader.read(-1), 20)
        client_port = writer.get_extra_info("sockname")[1]
        writer.close()
        assert hashlib.sha256(back).digest() == hashlib.sha256(payload).digest()
        [request] = seen
        assert request.target == Authority("::1", path.upstream[1])
        assert request.headers[":authority"] == f"[::1]:{path.upstream[1]}"
        assert request.destination == path.server.address and request.destination[0] == "::1"
        assert request.source[0] == "::1"
        # the forwarder saw the client at [::1]:<its port>; the destination takes that port from forwarded: for=
        assert request.headers["forwarded"] == f'for="[::1]:{client_port}"'
        assert forwarded_client(request.headers, request.source) == ("::1", client_port)


async def test_an_authority_naming_another_ipv6_address_is_refused(ca: CertificateAuthority,
                                                                   client_cert: WorkloadCertificate,
                                                                   server_cert: WorkloadCertificate) -> None:
    """The HBONE server serves its connection's destination only: [::2]:port on a connection to ::1 gets 400."""
    async with hbone_path(ca, client_cert, server_cert, host="::1") as path:
        path.forwarder.authority = Authority("::2", path.upstream[1])
        reader, _ = await path.open()
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(-1), 5)
        assert path.server.stats["rejected_request"] == 1


async def _upstream(host: str) -> AsyncIterator[tuple[str, int]]:
    server = await asyncio.start_server(echo, host, 0)
    try:
        yield server.sockets[0].getsockname()[0], server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def test_one_dual_stack_listener_serves_both_families(ca: CertificateAuthority,
                                                            client_cert: WorkloadCertificate,
                                                            server_cert: WorkloadCertificate) -> None:
    """The agent's listener shape (AF_INET6 on ::, IPV6_V6ONLY off): an IPv4 tunnel reads as IPv4 (not
    ::ffff:127.0.0.1), so its authority 127.0.0.1:port is its destination's and is served; IPv6 alike."""
    seen: list[InboundRequest] = []

    def record(request: InboundRequest) -> str | None:
        seen.append(request)
        return None

    listener = socket.create_server(("::", 0), family=socket.AF_INET6, dualstack_ipv6=True, backlog=64)
    server = HboneServer(fixed_certificate(server_cert), ca.trust_bundle, policy=record, connect_timeout=2.0)
    await server.start(sock=listener)
    port = listener.getsockname()[1]
    pool = Pool(ca.trust_bundle)
    forwarders: list[Forwarder] = []
    try:
        for host in ("127.0.0.1", "::1"):
            async for upstream in _upstream(host):
                forwarder = Forwarder(pool, client_cert, server_cert.identity, (host, port), Authority(*upstream))
                forwarders.append(forwarder)
                reader, writer = await asyncio.open_connection(*await forwarder.start(host))
                writer.write(b"hello over " + host.encode())
                writer.write_eof()
                assert await asyncio.wait_for(reader.read(-1), 10) == b"hello over " + host.encode()
                writer.close()
        assert [(r.source[0], r.destination[0], r.target.ip) for r in seen] == [
            ("127.0.0.1", "127.0.0.1", "127.0.0.1"), ("::1", "::1", "::1")]
        assert server.stats["rejected_request"] == 0
    finally:
        for forwarder in forwarders:
            await forwarder.close()
        await pool.close()
        await server.close()


async def test_dial_from_an_ipv6_source_binds_the_address_and_leaves_the_port_to_connect() -> None:
    """The HBONE and upstream dial of an IPv6 destination: an AF_INET6 socket bound to the source address with
    IP_BIND_ADDRESS_NO_PORT (its port chosen at connect for the 4-tuple); a source of the other family is refused
    as an OSError the proxies treat as a failed dial."""
    peers: list[tuple[str, int]] = []

    async def note(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peers.append(writer.get_extra_info("peername")[:2])
        writer.close()

    server = await asyncio.start_server(note, "::1", 0)
    address = server.sockets[0].getsockname()[:2]
    try:
        sock = await dial(address, "::1")
        with sock:
            assert sock.family == socket.AF_INET6
            assert sock.getsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT) == 1
            local = sock.getsockname()[:2]
            assert local[0] == "::1" and local[1] != 0
        with pytest.raises(OSError) as raised:
            await dial(address, "127.0.0.1")
        assert raised.value.errno == errno.EAFNOSUPPORT and "not the same IP family" in str(raised.value)
        for _ in range(100):  # bounded: the server task notes the peer soon after the connect
            if peers:
                break
            await asyncio.sleep(0.01)
        assert peers == [local]
    finally:
        server.close()
