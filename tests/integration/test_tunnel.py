"""HBONE end to end on loopback with real TLS: transfers, pooling, half-close, resets, back-pressure."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct

import h2.events
import pytest
from h2.errors import ErrorCodes

from agent.ca.authority import CertificateAuthority
from hbone.identity import WorkloadCertificate, client_context
from hbone.pool import PoolKey
from hbone.relay import Relay
from hbone.server import InboundRequest
from hbone.tunnel import StreamHandler, Tunnel
from tests.fixtures.certificates import spiffe
from tests.fixtures.eventually import eventually
from tests.fixtures.h2peer import TlsH2Peer, connect_headers
from tests.fixtures.hbone_path import Path, echo, hbone_path


async def test_bulk_byte_exact_both_ways(ca: CertificateAuthority, client_cert: WorkloadCertificate,
                                         server_cert: WorkloadCertificate) -> None:
    down = os.urandom(24 << 20)

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        digest = hashlib.sha256()
        while data := await reader.read(1 << 20):
            digest.update(data)
        writer.write(digest.digest())
        writer.write(down)
        await writer.drain()
        writer.close()

    async with hbone_path(ca, client_cert, server_cert, upstream) as path:
        up = os.urandom(32 << 20)
        reader, writer = await path.open()
        writer.write(up)
        await writer.drain()
        writer.write_eof()
        got = await reader.read(-1)
        writer.close()
    assert got[:32] == hashlib.sha256(up).digest()
    assert got[32:] == down


async def test_many_concurrent_streams_share_one_connection(ca: CertificateAuthority,
                                                            client_cert: WorkloadCertificate,
                                                            server_cert: WorkloadCertificate) -> None:
    async with hbone_path(ca, client_cert, server_cert) as path:
        async def one(i: int) -> bool:
            payload = os.urandom(64 * 1024 + i)
            reader, writer = await path.open()
            writer.write(payload)
            writer.write_eof()
            back = await reader.read(-1)
            writer.close()
            return back == payload

        results = await asyncio.gather(*(one(i) for i in range(60)))
        assert all(results)
        assert path.pool.connections() == 1
        assert path.server.stats["accepted"] == 60


async def test_pool_opens_a_new_connection_past_the_stream_limit(ca: CertificateAuthority,
                                                                 client_cert: WorkloadCertificate,
                                                                 server_cert: WorkloadCertificate) -> None:
    release = asyncio.Event()

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await release.wait()
        writer.close()

    async with hbone_path(ca, client_cert, server_cert, hold, max_streams=10) as path:
        conns = [await path.open() for _ in range(25)]
        await eventually(lambda: path.server.stats["accepted"] == 25, "25 accepted connections")
        key = PoolKey(client_cert.identity, server_cert.identity, path.server.address)
        assert path.pool.connections(key) == 3  # 10 + 10 + 5
        assert len(path.server.tunnels) == 3
        release.set()
        for reader, writer in conns:
            assert await reader.read(-1) == b""
            writer.close()


async def test_idle_connection_is_closed_and_then_redialled(ca: CertificateAuthority,
                                                           client_cert: WorkloadCertificate,
                                                           server_cert: WorkloadCertificate) -> None:
    async with hbone_path(ca, client_cert, server_cert, idle_timeout=0.2) as path:
        for _ in range(2):
            reader, writer = await path.open()
            writer.write(b"ping")
            writer.write_eof()
            assert await reader.read(-1) == b"ping"
            writer.close()
            assert path.pool.connections() == 1
            await eventually(lambda: path.pool.connections() == 0 and not path.server.tunnels,
                             "the idle connection closed")


async def test_idle_time_counts_from_the_last_stream(ca: CertificateAuthority, client_cert: WorkloadCertificate,
                                                    server_cert: WorkloadCertificate) -> None:
    """A connection used again while idle gets its whole idle timeout counted from its last stream, not from
    the first time it became idle."""
    async with hbone_path(ca, client_cert, server_cert, idle_timeout=0.4) as path:

        async def one_stream() -> None:
            reader, writer = await path.open()
            writer.write(b"ping")
            writer.write_eof()
            assert await reader.read(-1) == b"ping"
            writer.close()

        await one_stream()
        await asyncio.sleep(0.25)
        await one_stream()
        last = asyncio.get_running_loop().time()
        await asyncio.sleep(0.25)  # 0.5 s after the first stream, 0.25 s after the last
        assert path.pool.connections() == 1
        await eventually(lambda: path.pool.connections() == 0, "the idle connection closed")
        assert asyncio.get_running_loop().time() - last >= 0.4


async def test_half_close_both_ways(ca: CertificateAuthority, client_cert: WorkloadCertificate,
                                    server_cert: WorkloadCertificate) -> None:
    """The client's FIN reaches upstream as EOF while the reverse direction keeps flowing, and back."""

    async def answer_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.read(-1)  # returns only at EOF: the client's FIN crossed the tunnel
        for _ in range(3):
            writer.write(b"late:" + request)
            await writer.drain()
            await asyncio.sleep(0.01)
        writer.write_eof()
        await writer.drain()
        writer.close()

    async with hbone_path(ca, client_cert, server_cert, answer_after_eof) as path:
        reader, writer = await path.open()
        writer.write(b"question")
        writer.write_eof()
        assert await reader.read(-1) == b"late:question" * 3
        writer.close()


async def test_what_the_client_sent_before_the_accept_goes_out_behind_the_connect(
        ca: CertificateAuthority, client_cert: WorkloadCertificate, server_cert: WorkloadCertificate) -> None:
    """The forwarder reads what its client sent before the accept and sends it with the CONNECT: the server holds
    it before it even connects the upstream (one tunnel round trip sooner), and it arrives whole and in order."""
    first, rest = b"sent before the accept", os.urandom(300_000)
    held: list[int] = []

    async with hbone_path(ca, client_cert, server_cert) as path:
        connect = path.server.connect

        async def connect_seeing_what_is_held(request: InboundRequest) -> StreamHandler:
            held.append(sum(h.buffered for t in path.server.tunnels for h in t.streams.values()))
            return await connect(request)

        path.server.connect = connect_seeing_what_is_held
        for _ in range(2):  # the first stream dials the tunnel, the second finds it pooled
            sock = socket.create_connection(path.entry)  # blocking, before the loop runs the forwarder's accept
            sock.sendall(first)
            sock.setblocking(False)
            reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 22)
            writer.write(rest)
            writer.write_eof()
            assert await reader.read(-1) == first + rest
            writer.close()
    assert held == [len(first), len(first)]


async def test_a_stream_refused_unprocessed_is_retried_with_what_was_sent_behind_its_connect(
        ca: CertificateAuthority, client_cert: WorkloadCertificate, server_cert: WorkloadCertificate) -> None:
    first = b"sent before the accept"
    async with hbone_path(ca, client_cert, server_cert) as path:
        server, count = path.server, path.server.count

        def refuse_once(what: str) -> None:  # the first stream finds the server draining, the retry does not
            count(what)
            server.draining = False

        server.count = refuse_once  # type: ignore[method-assign]
        server.draining = True
        sock = socket.create_connection(path.entry)
        sock.sendall(first)
        sock.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write_eof()
        assert await reader.read(-1) == first
        writer.close()
        assert server.stats["refused_draining"] == 1 and server.stats["accepted"] == 1


async def test_a_server_that_speaks_first_is_served_with_nothing_to_send_behind_the_connect(
        ca: CertificateAuthority, client_cert: WorkloadCertificate, server_cert: WorkloadCertificate) -> None:
    async def banner_then_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 ready\r\n")
        await echo(reader, writer)

    async with hbone_path(ca, client_cert, server_cert, banner_then_echo) as path:
        reader, writer = await path.open()
        assert await reader.readexactly(11) == b"220 ready\r\n"
        writer.write(b"HELO\r\n")
        writer.write_eof()
        assert await reader.read(-1) == b"HELO\r\n"
        writer.close()


async def test_upstream_reset_becomes_client_reset(ca: CertificateAuthority, client_cert: WorkloadCertificate,
                                                   server_cert: WorkloadCertificate) -> None:
    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(5)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async with hbone_path(ca, client_cert, server_cert, reset) as path:
        reader, writer = await path.open()
        writer.write(b"hello")
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(-1), 5)
        writer.close()
        # the pooled connection survives a stream reset
        reader, writer = await path.open()
        writer.write(b"hello")
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(-1), 5)
        assert len(path.server.tunnels) == 1


async def test_client_reset_becomes_upstream_reset(ca: CertificateAuthority, client_cert: WorkloadCertificate,
                                                   server_cert: WorkloadCertificate) -> None:
    seen: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def watch(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read(-1)
            seen.set_result("eof")
        except ConnectionResetError:
            seen.set_result("reset")

    async with hbone_path(ca, client_cert, server_cert, watch) as path:
        _, writer = await path.open()
        writer.write(b"x")
        await writer.drain()
        await eventually(lambda: path.server.stats["accepted"] == 1, "one accepted connection")
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
        assert await asyncio.wait_for(seen, 5) == "reset"


async def test_unreachable_upstream_answers_503_and_resets_client(ca: CertificateAuthority,
                                                                  client_cert: WorkloadCertificate,
                                                                  server_cert: WorkloadCertificate) -> None:
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    async with hbone_path(ca, client_cert, server_cert, upstream_port=closed_port) as path:
        reader, _ = await path.open()
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(-1), 5)
        assert path.server.stats["upstream_failed"] == 1
        assert path.forwarder.failures == 1


async def test_connects_that_outlast_the_timeout_answer_503_oldest_first(ca: CertificateAuthority,
                                                                          client_cert: WorkloadCertificate,
                                                                          server_cert: WorkloadCertificate) -> None:
    """One timer serves every connect under way: each one that outlasts ``connect_timeout`` is cancelled and
    answered 503 (the client reset), in the order they began, and nothing of them is left behind."""
    began: list[float] = []
    ended: list[float] = []

    async def hangs(request: InboundRequest) -> StreamHandler:
        began.append(asyncio.get_running_loop().time())
        try:
            await asyncio.Event().wait()
        finally:
            ended.append(asyncio.get_running_loop().time())
        raise AssertionError("never connects")

    async def refused(path: Path) -> None:
        reader, _ = await path.open()
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(-1), 5)

    async with hbone_path(ca, client_cert, server_cert, connect=hangs, connect_timeout=0.5) as path:
        first = asyncio.create_task(refused(path))
        await eventually(lambda: len(began) == 1, "the first connect began")
        await asyncio.sleep(0.25)
        await asyncio.gather(first, refused(path))
        assert path.server.stats["upstream_failed"] == 2
        assert not path.server._connecting
    assert len(ended) == 2 and ended[0] <= ended[1]
    for start, end in zip(began, ended, strict=True):
        assert 0.5 <= end - start < 2.0


async def test_a_stream_reset_while_its_upstream_connects_is_forgotten_at_once(
        ca: CertificateAuthority, client_cert: WorkloadCertificate, server_cert: WorkloadCertificate) -> None:
    connecting = asyncio.Event()
    cancelled: list[bool] = []

    async def hangs(request: InboundRequest) -> StreamHandler:
        connecting.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(True)
            raise
        raise AssertionError("never connects")

    async with hbone_path(ca, client_cert, server_cert, connect=hangs, connect_timeout=30.0) as path:
        await path.open()
        await asyncio.wait_for(connecting.wait(), 5)
        await path.pool.close()  # the tunnel goes: its streams are reset on the server
        await eventually(lambda: cancelled == [True] and not path.server._connecting,
                         "the reset stream's connect cancelled and forgotten, long before its timeout")
        assert path.server.stats["upstream_failed"] == 0


async def test_streams_reset_in_the_same_read_as_their_connect_are_forgotten_without_a_connect(
        ca: CertificateAuthority, client_cert: WorkloadCertificate, server_cert: WorkloadCertificate) -> None:
    """A CONNECT and its RST_STREAM in one read: the connect's task is cancelled before it ever ran (no ``finally``
    of its own), and the stream is forgotten all the same."""
    began: list[int] = []

    async def hangs(request: InboundRequest) -> StreamHandler:
        began.append(1)
        await asyncio.Event().wait()
        raise AssertionError("never connects")

    async with hbone_path(ca, client_cert, server_cert, connect=hangs, connect_timeout=30.0) as path:
        peer = await TlsH2Peer.connect(path.server.address, client_context(client_cert, ca.trust_bundle))
        try:
            for stream_id in (1, 3, 5):
                peer.conn.send_headers(stream_id, connect_headers(f"{path.upstream[0]}:{path.upstream[1]}"))
                peer.conn.reset_stream(stream_id, ErrorCodes.CANCEL)
            await peer.flush()  # (all six frames in one write)
            peer.conn.ping(b"12345678")
            await peer.flush()
            await peer.wait_for(lambda ev: isinstance(ev, h2.events.PingAckReceived))  # the server read them all
            await asyncio.sleep(0.05)  # (a cancelled task is reaped on the next loop turns)
            assert not path.server._connecting and began == []
        finally:
            await peer.close()


async def test_the_established_hook_hears_of_each_admitted_stream_once_its_relay_runs(
        ca: CertificateAuthority, client_cert: WorkloadCertificate, server_cert: WorkloadCertificate) -> None:
    """The hook (where the agent starts a connection's flow) runs after the 200, with the stream's relay started;
    once per admitted stream, never for one denied."""
    heard: list[tuple[str, bool]] = []

    def established(request: InboundRequest, handler: StreamHandler) -> None:
        assert isinstance(handler, Relay)
        heard.append((request.target.ip, handler.started))

    def deny_second(request: InboundRequest) -> str | None:
        return "only one" if heard else None

    async with hbone_path(ca, client_cert, server_cert, established=established, policy=deny_second) as path:
        reader, writer = await path.open()
        writer.write(b"ping")
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(-1), 5) == b"ping"
        reader, _ = await path.open()
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(-1), 5)
        assert path.server.stats["denied"] == 1
    assert heard == [("127.0.0.1", True)]


async def test_policy_denial_answers_401(ca: CertificateAuthority, client_cert: WorkloadCertificate,
                                         server_cert: WorkloadCertificate) -> None:
    asked: list[InboundRequest] = []

    def deny(request: InboundRequest) -> str | None:
        asked.append(request)
        return "test policy denies everyone"

    async with hbone_path(ca, client_cert, server_cert, policy=deny) as path:
        reader, _ = await path.open()
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(-1), 5)
        assert path.server.stats["denied"] == 1
        assert asked[0].peer == client_cert.identity
        assert asked[0].target.port == path.upstream[1]
        assert asked[0].headers["forwarded"].startswith('for="127.0.0.1:')
        assert "traceparent" in asked[0].headers


async def test_client_refuses_server_with_unexpected_identity(ca: CertificateAuthority,
                                                              client_cert: WorkloadCertificate,
                                                              server_cert: WorkloadCertificate,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    async with hbone_path(ca, client_cert, server_cert, expect=spiffe("default", "someone-else")) as path:
        reader, _ = await path.open()
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(-1), 5)
        assert path.server.stats["accepted"] == 0
        assert "is not the expected spiffe://cluster.local/ns/default/sa/someone-else" in caplog.text


async def test_slow_reader_bounds_agent_memory(ca: CertificateAuthority, client_cert: WorkloadCertificate,
                                               server_cert: WorkloadCertificate) -> None:
    """An upstream that writes far more than the client reads fills windows, then stops: the agent's
    buffers (transport write buffers, relay backlogs) never exceed what the windows allow."""
    # What may hold the bytes: the agents' windows and buffers, and the kernel's buffers of the three TCP
    # connections on the way (upstream, tunnel, client), which autotune up to the sysctl maxima.
    agent_bound = 2 * (4 + 1 + 4 + 1) << 20  # per side: stream window, TCP and TLS high-water, one read
    kernel = 3 * (_sysctl_max("tcp_rmem") + _sysctl_max("tcp_wmem"))
    total = max(256, 2 * (kernel + agent_bound) >> 20) << 20  # far more than all of them hold
    chunk = os.urandom(1 << 20)
    written = 0

    async def firehose(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal written
        while written < total:
            writer.write(chunk)
            written += len(chunk)
            await writer.drain()
        writer.close()

    async with hbone_path(ca, client_cert, server_cert, firehose) as path:
        reader, writer = await path.open()
        peak = 0
        history: list[int] = []
        for _ in range(100):  # up to 5 s of not reading at all, until the upstream has been stuck for 0.5 s
            await asyncio.sleep(0.05)
            peak = max(peak, _agent_buffered(path))
            history.append(written)
            if len(history) >= 40 and len(set(history[-10:])) == 1:
                break
        stalled_at = written
        assert len(set(history[-10:])) == 1, f"upstream still writing after {len(history) * 0.05:.1f} s"
        assert stalled_at <= kernel + agent_bound, \
            f"upstream wrote {stalled_at >> 20} MiB to a client that reads nothing"
        assert peak <= agent_bound, f"agent buffered {peak >> 20} MiB"
        received = 0
        digest = hashlib.sha256()
        while data := await reader.read(1 << 20):
            received += len(data)
            digest.update(data)
        writer.close()
    assert received == total
    assert digest.digest() == hashlib.sha256(chunk * (total >> 20)).digest()


def _sysctl_max(name: str) -> int:
    """The largest buffer the kernel may give a TCP socket (the third field of net.ipv4.tcp_rmem/tcp_wmem)."""
    with open(f"/proc/sys/net/ipv4/{name}") as f:
        return int(f.read().split()[2])


def _agent_buffered(path: Path) -> int:
    """Bytes the in-process agent holds: write buffers of every transport plus relay backlogs."""
    size = 0
    tunnels: list[Tunnel] = list(path.server.tunnels)
    for entries in path.pool._entries.values():
        for entry in entries:
            if entry.dial.done() and not entry.dial.exception():
                tunnels.append(entry.dial.result())
    for tunnel in tunnels:
        if tunnel.transport is not None:
            size += tunnel.transport.get_write_buffer_size()
        for relay in tunnel.streams.values():
            size += relay.buffered
    return size
