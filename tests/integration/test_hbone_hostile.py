"""Issue 17's defects, each replayed at the wire against a real HBONE server on loopback (raw frames over
real mutual TLS), as an attacker holding a valid workload certificate would. Each test also checks that
the server logged no error or traceback and, where it matters, that a legitimate client still gets
through the same server byte-exact."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections import Counter
from collections.abc import AsyncIterator

import pytest

from agent.ca.authority import CertificateAuthority
from hbone import Settings, WorkloadCertificate
from hbone.identity import client_context
from tests.fixtures.eventually import eventually
from tests.fixtures.hbone_path import Path, echo, hbone_path
from tests.fixtures.rawh2 import (
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    RawPeer,
    frame,
    goaway,
    ping,
    rst_stream,
)
from tests.integration.test_tunnel_rejects import still_serves

ENHANCE_YOUR_CALM, PROTOCOL_ERROR, NO_ERROR = 0xB, 0x1, 0x0


class Hostile:
    def __init__(self, path: Path, ctx: ssl.SSLContext, upstream: Counter[str]) -> None:
        self.path, self.ctx, self.upstream = path, ctx, upstream
        self.authority = f"{path.upstream[0]}:{path.upstream[1]}"

    async def peer(self, **kwargs: object) -> RawPeer:
        return await RawPeer.connect(self.path.server.address, self.ctx, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
async def hostile(ca: CertificateAuthority, client_cert: WorkloadCertificate, server_cert: WorkloadCertificate,
                  caplog: pytest.LogCaptureFixture) -> AsyncIterator[Hostile]:
    caplog.set_level(logging.INFO, logger="hbone")
    upstream: Counter[str] = Counter()

    async def counting_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream["connections"] += 1
        upstream["open"] += 1
        upstream["peak"] = max(upstream["peak"], upstream["open"])
        try:
            await echo(reader, writer)
        except ConnectionError:
            pass
        finally:
            upstream["open"] -= 1

    async with hbone_path(ca, client_cert, server_cert, counting_echo) as path:
        yield Hostile(path, client_context(client_cert, ca.trust_bundle), upstream)
    errors = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not errors, errors


# -- 1: CONTINUATION flood


async def test_a_header_block_over_eight_continuation_frames_ends_the_connection(hostile: Hostile) -> None:
    peer = await hostile.peer()
    block = peer.encoder.encode([(b":method", b"CONNECT"), (b":authority", hostile.authority.encode())])
    pieces = [block[i:i + 1] for i in range(len(block))]
    assert len(pieces) > 10
    peer.write(frame(HEADERS, 0, 1, pieces[0]), *(frame(CONTINUATION, 0, 1, p) for p in pieces[1:11]))
    calm = await peer.read_until(lambda f: f.kind == GOAWAY)
    assert calm.error_code == ENHANCE_YOUR_CALM
    assert b"CONTINUATION" in calm.payload[8:]
    await peer.read_to_eof()
    assert hostile.upstream["connections"] == 0
    await still_serves(hostile.path)


async def test_a_header_block_is_bounded_in_bytes_as_its_frames_arrive(hostile: Hostile) -> None:
    peer = await hostile.peer()
    fragment = b"\x00" * (16 * 1024)  # never decodable: the block is refused before it would be decoded
    peer.write(frame(HEADERS, 0, 1, fragment), frame(CONTINUATION, 0, 1, fragment),
               frame(CONTINUATION, 0, 1, fragment))
    calm = await peer.read_until(lambda f: f.kind == GOAWAY)
    assert calm.error_code == ENHANCE_YOUR_CALM
    await peer.read_to_eof()
    await still_serves(hostile.path)


async def test_frames_other_than_data_are_refused_on_their_header_when_too_large(hostile: Hostile) -> None:
    peer = await hostile.peer()
    peer.write(frame(HEADERS, END_HEADERS, 1, b"")[:3].replace(b"\x00\x00\x00", (1 << 20).to_bytes(3, "big"))
               + bytes([HEADERS, END_HEADERS]) + (1).to_bytes(4, "big"))  # a 1 MiB HEADERS, header only
    too_big = await peer.read_until(lambda f: f.kind == GOAWAY)
    assert too_big.error_code == 0x6  # FRAME_SIZE_ERROR, without waiting for the megabyte
    await peer.read_to_eof()


async def test_flooding_connections_are_cut_while_a_legitimate_client_is_served(hostile: Hostile) -> None:
    """The campaign's finding: 4 connections pinned ~64 MiB each and stalled legitimate traffic."""
    peers = [await hostile.peer() for _ in range(4)]
    for peer in peers:
        peer.write(frame(HEADERS, 0, 1, b"\x00" * 16000), frame(CONTINUATION, 0, 1, b"\x00" * 16000),
                   frame(CONTINUATION, 0, 1, b"\x00" * 16000))
    await still_serves(hostile.path)
    for peer in peers:
        assert (await peer.read_until(lambda f: f.kind == GOAWAY)).error_code == ENHANCE_YOUR_CALM
        await peer.read_to_eof()
    await eventually(lambda: len(hostile.path.server.tunnels) == 1, "only the pooled tunnel left")


# -- 2: rapid reset


async def test_rapid_reset_dials_nothing_and_ends_the_connection(hostile: Hostile) -> None:
    peer = await hostile.peer()
    pairs = [b"".join((peer.connect_request(s, hostile.authority), rst_stream(s))) for s in range(1, 600, 2)]
    peer.write(*pairs)  # 300 CONNECT + RST_STREAM pairs in one write
    calm = await peer.read_until(lambda f: f.kind == GOAWAY)
    assert calm.error_code == ENHANCE_YOUR_CALM
    assert b"rapid reset" in calm.payload[8:]
    await peer.read_to_eof()
    await asyncio.sleep(0.3)  # a dial, had one started, would have reached the upstream by now
    assert hostile.upstream["connections"] == 0
    await still_serves(hostile.path)
    assert hostile.upstream["connections"] == 1


async def test_streams_reset_while_their_upstream_connects_cancel_the_connect(hostile: Hostile) -> None:
    """Resets in the next read, after the dials started: the connects are cancelled, none is kept."""
    peer = await hostile.peer()
    ids = range(1, 100, 2)  # 50 streams, within the reset budget
    peer.write(*(peer.connect_request(s, hostile.authority) for s in ids))
    await asyncio.sleep(0)
    peer.write(*(rst_stream(s) for s in ids))
    await asyncio.sleep(0.3)
    assert hostile.upstream["open"] == 0
    peer.write(peer.connect_request(101, hostile.authority), frame(DATA, END_STREAM, 101, b"still here"))
    await peer.read_until(lambda f: peer.ended(101))
    assert peer.body(101) == b"still here"
    await peer.close()


# -- 3: END_STREAM before the upstream is connected


async def test_connect_data_and_end_stream_in_one_write(hostile: Hostile) -> None:
    peer = await hostile.peer()
    peer.write(peer.connect_request(1, hostile.authority), frame(DATA, END_STREAM, 1, b"hello, early"))
    answer = await peer.read_until(lambda f: f.kind == HEADERS and f.stream_id == 1)
    assert answer.headers[b":status"] == b"200"
    await peer.read_until(lambda f: peer.ended(1), within=3.0)  # the upstream saw the FIN and echoed its own
    assert peer.body(1) == b"hello, early"
    await eventually(lambda: hostile.upstream["open"] == 0, "no upstream connection open")
    await peer.close()


async def test_connect_with_end_stream_on_its_headers(hostile: Hostile) -> None:
    peer = await hostile.peer()
    peer.write(peer.connect_request(1, hostile.authority, end_stream=True))
    await peer.read_until(lambda f: peer.ended(1), within=3.0)
    assert peer.body(1) == b""
    await eventually(lambda: hostile.upstream["open"] == 0, "no upstream connection open")
    await peer.close()


# -- 4: after the connection ends (a GOAWAY in the same read, or our own after a protocol error)


async def test_a_graceful_goaway_after_a_request_lets_that_stream_finish(hostile: Hostile) -> None:
    peer = await hostile.peer()
    peer.write(peer.connect_request(1, hostile.authority), frame(DATA, END_STREAM, 1, b"last words"), goaway(0))
    answer = await peer.read_until(lambda f: f.kind == HEADERS and f.stream_id == 1)
    assert answer.headers[b":status"] == b"200"
    await peer.read_to_eof()  # the server closes once that stream is done
    assert peer.body(1) == b"last words" and peer.ended(1)
    assert hostile.path.server.stats["protocol_error"] == 0


async def test_a_request_answered_400_then_goaway_in_the_same_read(hostile: Hostile) -> None:
    peer = await hostile.peer()
    peer.write(peer.headers(1, [(":method", "GET"), (":scheme", "https"), (":path", "/"),
                                (":authority", hostile.authority)]), goaway(0))
    answer = await peer.read_until(lambda f: f.kind == HEADERS and f.stream_id == 1)
    assert answer.headers[b":status"] == b"400"
    await peer.read_to_eof()
    await still_serves(hostile.path)


async def test_a_protocol_error_after_a_request_in_the_same_read_sends_goaway(hostile: Hostile) -> None:
    peer = await hostile.peer()
    zero_increment = frame(0x8, 0, 0, (0).to_bytes(4, "big"))  # WINDOW_UPDATE of 0: PROTOCOL_ERROR
    peer.write(peer.connect_request(1, hostile.authority), zero_increment, peer.connect_request(3, hostile.authority))
    error = await peer.read_until(lambda f: f.kind == GOAWAY)
    assert error.error_code == PROTOCOL_ERROR
    await peer.read_to_eof()
    await asyncio.sleep(0.2)
    assert hostile.upstream["connections"] == 0  # the connection ended in that read: nothing to answer
    assert hostile.path.server.stats["protocol_error"] == 1
    await still_serves(hostile.path)


# -- 7: control-frame replies to a peer that does not read


async def test_pings_from_a_peer_that_never_reads_are_bounded(hostile: Hostile) -> None:
    hostile.path.server.settings = Settings(max_queued_control=1000)
    small = [(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)]
    tunnels = set(hostile.path.server.tunnels)
    peer = await hostile.peer(sock_options=small)
    await eventually(lambda: len(hostile.path.server.tunnels) > len(tunnels), "a new tunnel")
    batch = ping() * 20_000
    closed = False
    for _ in range(40):  # up to 800,000 PINGs (13.6 MB), far more than the replies the server may queue
        if peer.writer.is_closing():
            break
        peer.write(batch)
        try:
            await asyncio.wait_for(peer.writer.drain(), 5)
        except (ConnectionError, ssl.SSLError):
            closed = True
            break
        server_side = [t for t in hostile.path.server.tunnels if t not in tunnels]
        if not server_side:
            closed = True
            break
        assert server_side[0].transport is not None
        assert server_side[0].transport.get_write_buffer_size() < 8 << 20  # never 1:1 with the PINGs
    assert closed or not [t for t in hostile.path.server.tunnels if t not in tunnels]
    assert hostile.path.server.stats["protocol_error"] == 1
    await still_serves(hostile.path)


# -- 8: idle and header-read timeouts


async def test_a_connection_without_streams_is_closed_when_idle(hostile: Hostile) -> None:
    hostile.path.server.idle_timeout = 0.5
    peer = await hostile.peer()
    await peer.read_to_eof(within=3.0)
    bye = peer.goaway()
    assert bye is not None and bye.error_code == NO_ERROR
    assert hostile.path.server.stats["idle_timeout"] == 1


async def test_idle_timeout_spares_a_connection_with_an_open_stream(hostile: Hostile) -> None:
    hostile.path.server.idle_timeout = 0.3
    peer = await hostile.peer()
    peer.write(peer.connect_request(1, hostile.authority))
    await peer.read_until(lambda f: f.kind == HEADERS and f.stream_id == 1)
    await asyncio.sleep(0.8)
    peer.write(frame(DATA, END_STREAM, 1, b"after a pause"))
    await peer.read_until(lambda f: peer.ended(1))
    assert peer.body(1) == b"after a pause"
    await peer.read_to_eof(within=3.0)  # and once it is done, the idle timeout applies again


async def test_the_idle_timeout_counts_from_the_end_of_the_last_stream(hostile: Hostile) -> None:
    hostile.path.server.idle_timeout = 0.5
    loop = asyncio.get_running_loop()
    peer = await hostile.peer()
    await asyncio.sleep(0.3)  # idle from the start: the check set then must not close it at 0.5 s
    peer.write(peer.connect_request(1, hostile.authority))
    await peer.read_until(lambda f: f.kind == HEADERS and f.stream_id == 1)
    peer.write(frame(DATA, END_STREAM, 1, b"one"))
    await peer.read_until(lambda f: peer.ended(1))
    ended = loop.time()
    await asyncio.sleep(0.35)
    assert hostile.path.server.stats["idle_timeout"] == 0
    await peer.read_to_eof(within=3.0)
    assert hostile.path.server.stats["idle_timeout"] == 1
    assert loop.time() - ended >= 0.45


async def test_a_header_block_left_unfinished_is_cut_by_the_header_timeout(hostile: Hostile) -> None:
    hostile.path.server.header_timeout = 0.5
    peer = await hostile.peer()
    block = peer.encoder.encode([(b":method", b"CONNECT"), (b":authority", hostile.authority.encode())])
    peer.write(frame(HEADERS, 0, 1, block[:3]))
    await peer.read_to_eof(within=3.0)
    bye = peer.goaway()
    assert bye is not None and bye.error_code == ENHANCE_YOUR_CALM
    assert hostile.path.server.stats["headers_timeout"] == 1


async def test_a_preface_sent_slowly_is_cut_by_the_header_timeout(hostile: Hostile) -> None:
    hostile.path.server.header_timeout = 0.5
    peer = await hostile.peer(preface=False)
    peer.write(b"PRI * HTTP/2.0\r\n")
    await peer.read_to_eof(within=3.0)
    assert hostile.path.server.stats["headers_timeout"] == 1
    await still_serves(hostile.path)

