"""A tunnel with several streams writes once per turn of the event loop: the CONNECTs of streams opened in one
turn leave together (real TLS, real h2, loopback)."""

from __future__ import annotations

import asyncio

from agent.ca.authority import CertificateAuthority
from hbone import HboneServer, Relay, WorkloadCertificate, fixed_certificate
from hbone.authority import Authority
from hbone.client import open_tunnel, request_headers


async def test_streams_opened_in_one_turn_leave_in_two_writes_and_are_all_answered(
        ca: CertificateAuthority, client_cert: WorkloadCertificate, server_cert: WorkloadCertificate) -> None:
    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    upstream = await asyncio.start_server(sink, "127.0.0.1", 0)
    target = Authority("127.0.0.1", upstream.sockets[0].getsockname()[1])
    server = HboneServer(fixed_certificate(server_cert), ca.trust_bundle)
    await server.start("127.0.0.1", 0)
    tunnel = await open_tunnel(server.address, client_cert, server_cert.identity, ca.trust_bundle)
    try:
        written: list[bytes] = []
        write_now = tunnel.write_now

        def counted() -> None:
            written.append(tunnel.conn.data_to_send())  # what this write takes (then written below)
            tunnel.conn._out.append(written[-1])
            write_now()

        tunnel.write_now = counted  # type: ignore[method-assign]
        await asyncio.sleep(0.05)  # the settings exchange is over
        written.clear()
        answers = [tunnel.open(Relay(), target, request_headers(("127.0.0.1", 40000 + i))) for i in range(10)]
        await asyncio.sleep(0)  # the end of the turn
        # the first stream, alone on the tunnel, is written at once; the nine others at the end of the turn
        assert [w.count(b'for="127.0.0.1:400') for w in written] == [1, 9]
        responses = await asyncio.wait_for(asyncio.gather(*answers), 10)
        assert [r.status for r in responses] == [200] * 10
    finally:
        tunnel.close()
        await server.close()
        upstream.close()
        await upstream.wait_closed()
