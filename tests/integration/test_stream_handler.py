"""The stream-handler seam: the server hands an admitted CONNECT stream to any ``StreamHandler`` its
upstream hook returns, not only to a TCP relay. Here an in-memory one (what a waypoint's HTTP codec would
be) answers on the stream itself, with back-pressure: it acknowledges what it has passed on and keeps
what the windows cannot take until they open."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from agent.ca.authority import CertificateAuthority
from hbone import Data, HboneServer, InboundRequest, StreamHandler, WorkloadCertificate, fixed_certificate
from hbone.identity import client_context
from tests.fixtures.rawh2 import DATA, END_STREAM, HEADERS, RawPeer, frame


class Shout(StreamHandler):
    """Sends back what it receives, upper-cased, and ends when the peer does."""

    def __init__(self, request: InboundRequest) -> None:
        super().__init__()
        self.request = request
        self.waiting = b""
        self.peer_ended = False
        self.started = False

    @property
    def buffered(self) -> int:
        return len(self.waiting)

    def start(self) -> None:
        self.started = True
        self._send()

    def on_data(self, d: Data) -> None:
        assert self.tunnel is not None
        self.waiting += bytes(d.data).upper()
        self.tunnel.conn.ack(self.stream_id, d.flow_length)
        self._send()

    def on_end(self) -> None:
        self.peer_ended = True
        self._send()

    def on_reset(self, reason: str) -> None:
        self.finish(reason)

    def on_window(self) -> None:
        self._send()

    def on_tunnel_paused(self, paused: bool) -> None:
        pass

    def _send(self) -> None:
        if self.tunnel is None or not self.started:
            return
        taken = self.tunnel.conn.send(self.stream_id, self.waiting)
        self.waiting = self.waiting[taken:]
        if not self.waiting and self.peer_ended:
            self.tunnel.conn.end(self.stream_id)
            self.finish("closed")
        self.tunnel.flush()


HANDLERS: list[Shout] = []


@pytest.fixture
async def server(ca: CertificateAuthority, server_cert: WorkloadCertificate) -> AsyncIterator[HboneServer]:
    async def shout(request: InboundRequest) -> StreamHandler:
        await asyncio.sleep(0.01)  # whatever the consumer needs before it can take the stream
        HANDLERS.append(Shout(request))
        return HANDLERS[-1]

    hbone = HboneServer(fixed_certificate(server_cert), ca.trust_bundle, connect=shout)
    await hbone.start("127.0.0.1", 0)
    yield hbone
    await hbone.close()


async def test_a_stream_consumed_by_a_handler_other_than_a_relay(server: HboneServer, ca: CertificateAuthority,
                                                                 client_cert: WorkloadCertificate) -> None:
    peer = await RawPeer.connect(server.address, client_context(client_cert, ca.trust_bundle))
    # data and END_STREAM before the handler exists: they wait, then reach it in order
    peer.write(peer.connect_request(1, "127.0.0.1:9"), frame(DATA, 0, 1, b"hello, "),
               frame(DATA, END_STREAM, 1, b"waypoint"))
    answer = await peer.read_until(lambda f: f.kind == HEADERS and f.stream_id == 1)
    assert answer.headers[b":status"] == b"200"
    await peer.read_until(lambda f: peer.ended(1))
    assert peer.body(1) == b"HELLO, WAYPOINT"
    # more than the client's 64 KiB windows: the handler keeps the rest until a WINDOW_UPDATE opens them
    big = bytes(range(97, 123)) * 8000
    chunks = [big[i:i + 16384] for i in range(0, len(big), 16384)]
    peer.write(peer.connect_request(3, "127.0.0.1:9"), *(frame(DATA, 0, 3, c) for c in chunks[:-1]),
               frame(DATA, END_STREAM, 3, chunks[-1]))
    await peer.read_until(lambda f: len(peer.body(3)) >= 60000)
    await asyncio.sleep(0.2)
    window = len(peer.body(3))
    assert window < 65536 and HANDLERS[-1].buffered == len(big) - window
    peer.write(frame(0x8, 0, 3, (1 << 20).to_bytes(4, "big")), frame(0x8, 0, 0, (1 << 20).to_bytes(4, "big")))
    await peer.read_until(lambda f: peer.ended(3))
    assert peer.body(3) == big.upper()
    assert server.stats["accepted"] == 2 and not any(t.streams for t in server.tunnels)
    await peer.close()
