"""The HBONE server against bad clients, over real sockets and real TLS on loopback.

Each test feeds the server of a real path (tests.fixtures.hbone_path.hbone_path) one kind of bad input and checks
that it is rejected clearly (the answer on the wire, a stats counter, a log line saying what) and that the
server keeps serving: afterwards a good client still moves data through the same server byte-exact.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import re
import ssl
from collections.abc import AsyncIterator

import h2.events
import pytest
from h2.errors import ErrorCodes

from agent.ca.authority import CertificateAuthority
from hbone.identity import ALPN, SpiffeId, WorkloadCertificate, client_context
from hbone.protocol import KIB, Settings
from hbone.server import InboundRequest
from tests.fixtures.certificates import spiffe
from tests.fixtures.eventually import eventually
from tests.fixtures.h2peer import TlsH2Peer, connect_headers
from tests.fixtures.hbone_path import Path, hbone_path

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@pytest.fixture
async def path(ca: CertificateAuthority, client_cert: WorkloadCertificate, server_cert: WorkloadCertificate,
               caplog: pytest.LogCaptureFixture) -> AsyncIterator[Path]:
    caplog.set_level(logging.INFO, logger="hbone")
    async with hbone_path(ca, client_cert, server_cert) as p:
        yield p


def server_log(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("hbone"))


async def still_serves(path: Path, size: int = 256 * KIB) -> None:
    """A good client through the forwarder and the pool: a fresh stream, byte-exact both ways."""
    accepted = path.server.stats["accepted"]
    payload = os.urandom(size)
    reader, writer = await asyncio.wait_for(path.open(), 5)
    try:
        writer.write(payload)
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(-1), 5) == payload
    finally:
        writer.close()
    assert path.server.stats["accepted"] == accepted + 1


async def read_until_closed(reader: asyncio.StreamReader, within: float = 5.0) -> bytes:
    """Everything the server sends before it closes (EOF, reset or TLS alert all count as closed)."""
    got = b""
    async with asyncio.timeout(within):
        while True:
            try:
                data = await reader.read(1 << 16)
            except (ConnectionError, ssl.SSLError):
                return got
            if not data:
                return got
            got += data


async def tls_attempt(address: tuple[str, int], ctx: ssl.SSLContext) -> bytes:
    """Try a TLS session and speak HTTP/2; returns what the server sent before closing (HTTP/2 bytes would
    mean it let the client in). TLS 1.3 clients finish their handshake before the server has checked their
    certificate, so the refusal may come at the handshake or at the first read."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(*address, ssl=ctx), 5)
    except (ssl.SSLError, ConnectionError):
        return b""
    try:
        writer.write(PREFACE)
        return await read_until_closed(reader)
    finally:
        writer.close()


def no_cert_context(ca: CertificateAuthority) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=ca.root_pem.decode())
    ctx.set_alpn_protocols([ALPN])
    return ctx


def expired_cert(ca: CertificateAuthority) -> WorkloadCertificate:
    past = CertificateAuthority(ca.trust_domain, ca.root_cert, ca.root_key,
                                clock=lambda: dt.datetime.now(dt.UTC) - dt.timedelta(days=2))
    cert = past.issue(spiffe("default", "client"), dt.timedelta(hours=1))
    assert cert.not_after < dt.datetime.now(dt.UTC)
    return cert


def foreign_ca_cert() -> WorkloadCertificate:
    return CertificateAuthority.create("cluster.local").issue(spiffe("default", "client"))


async def open_and_echo(peer: TlsH2Peer, stream_id: int, authority: str) -> None:
    """On a raw connection: CONNECT answered 200, then bytes echoed back byte-exact by the upstream."""
    peer.conn.send_headers(stream_id, connect_headers(authority))
    await peer.flush()
    assert await peer.response(stream_id) == 200
    payload = os.urandom(32 * KIB)
    peer.conn.send_data(stream_id, payload, end_stream=True)
    await peer.flush()
    assert await peer.body(stream_id) == payload


def upstream_authority(path: Path) -> str:
    return f"{path.upstream[0]}:{path.upstream[1]}"


# -- before HTTP/2: TCP and TLS


async def test_garbage_on_the_tls_port(path: Path, caplog: pytest.LogCaptureFixture) -> None:
    reader, writer = await asyncio.open_connection(*path.server.address)
    port = writer.get_extra_info("sockname")[1]
    writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert await read_until_closed(reader) == b""
    writer.close()
    await eventually(lambda: path.server.stats["handshake_failed"] == 1, "one failed handshake counted")
    assert re.search(rf"HBONE from \('127\.0\.0\.1', {port}\): TLS handshake failed: \w+", server_log(caplog))
    assert not path.server.tunnels
    await still_serves(path)


async def test_tls_without_a_client_certificate(path: Path, ca: CertificateAuthority,
                                                caplog: pytest.LogCaptureFixture) -> None:
    assert await tls_attempt(path.server.address, no_cert_context(ca)) == b""
    await eventually(lambda: path.server.stats["handshake_failed"] == 1, "one failed handshake counted")
    assert "TLS handshake failed: PEER_DID_NOT_RETURN_A_CERTIFICATE" in server_log(caplog)
    assert not path.server.tunnels
    await still_serves(path)


async def test_client_certificate_from_another_ca(path: Path, ca: CertificateAuthority,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    assert await tls_attempt(path.server.address, client_context(foreign_ca_cert(), ca.trust_bundle)) == b""
    await eventually(lambda: path.server.stats["handshake_failed"] == 1, "one failed handshake counted")
    assert "TLS handshake failed: CERTIFICATE_VERIFY_FAILED" in server_log(caplog)
    assert path.server.stats["identity_rejected"] == 0
    await still_serves(path)


async def test_expired_client_certificate(path: Path, ca: CertificateAuthority,
                                          caplog: pytest.LogCaptureFixture) -> None:
    assert await tls_attempt(path.server.address, client_context(expired_cert(ca), ca.trust_bundle)) == b""
    await eventually(lambda: path.server.stats["handshake_failed"] == 1, "one failed handshake counted")
    assert "TLS handshake failed: CERTIFICATE_VERIFY_FAILED" in server_log(caplog)
    await still_serves(path)


@pytest.mark.parametrize(("case", "why"), [("expired", "certificate has expired"),
                                           ("another CA", "unable to get local issuer certificate")])
async def test_certificate_rejection_log_says_why(path: Path, ca: CertificateAuthority,
                                                  caplog: pytest.LogCaptureFixture, case: str, why: str) -> None:
    cert = expired_cert(ca) if case == "expired" else foreign_ca_cert()
    await tls_attempt(path.server.address, client_context(cert, ca.trust_bundle))
    await eventually(lambda: path.server.stats["handshake_failed"] == 1, "one failed handshake counted")
    assert why in server_log(caplog)


async def test_client_certificate_from_another_trust_domain(path: Path, ca: CertificateAuthority,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    other = CertificateAuthority(trust_domain="other.domain", root_cert=ca.root_cert, root_key=ca.root_key)
    cert = other.issue(SpiffeId("other.domain", "default", "client"))
    assert await tls_attempt(path.server.address, client_context(cert, ca.trust_bundle)) == b""  # chain is fine
    await eventually(lambda: path.server.stats["identity_rejected"] == 1, "one rejected identity counted")
    assert ("peer identity spiffe://other.domain/ns/default/sa/client is outside trust domain 'cluster.local'"
            in server_log(caplog))
    assert path.server.stats["handshake_failed"] == 0
    assert not path.server.tunnels
    await still_serves(path)


async def test_handshake_never_completed_times_out(path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path.server.handshake_timeout = 0.5
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection(*path.server.address)
    started = loop.time()
    await still_serves(path)  # a stalled handshake holds up nobody else
    assert await read_until_closed(reader, within=3.0) == b""
    elapsed = loop.time() - started
    writer.close()
    assert 0.4 < elapsed < 2.5, f"closed after {elapsed:.2f}s"
    await eventually(lambda: path.server.stats["handshake_failed"] == 1, "one failed handshake counted")
    assert re.search(r"TLS handshake failed: .*(timed out|taking longer than 0\.5 seconds)", server_log(caplog))
    await still_serves(path)


# -- HTTP/2 over a good mTLS connection


async def test_non_connect_method_answers_400(path: Path, ca: CertificateAuthority,
                                              client_cert: WorkloadCertificate,
                                              caplog: pytest.LogCaptureFixture) -> None:
    peer = await TlsH2Peer.connect(path.server.address, client_context(client_cert, ca.trust_bundle))
    try:
        peer.conn.send_headers(1, connect_headers(upstream_authority(path), (b":scheme", b"https"),
                                                  (b":path", b"/"), method=b"GET"), end_stream=True)
        await peer.flush()
        assert await peer.response(1) == 400
        assert await peer.body(1) == b""  # END_STREAM
        assert path.server.stats["rejected_request"] == 1
        assert re.search(r"HBONE stream 1 from .*: method 'GET' is not CONNECT -> 400", server_log(caplog))
        await open_and_echo(peer, 3, upstream_authority(path))  # the connection itself is fine
    finally:
        await peer.close()
    await still_serves(path)


@pytest.mark.parametrize("authority", ["example.com:80", "127.0.0.1", "127.0.0.1:0"])
async def test_malformed_authority_answers_400(path: Path, ca: CertificateAuthority,
                                               client_cert: WorkloadCertificate,
                                               caplog: pytest.LogCaptureFixture, authority: str) -> None:
    peer = await TlsH2Peer.connect(path.server.address, client_context(client_cert, ca.trust_bundle))
    try:
        peer.conn.send_headers(1, connect_headers(authority))
        await peer.flush()
        assert await peer.response(1) == 400
        assert path.server.stats["rejected_request"] == 1
        assert re.search(rf"HBONE stream 1 from .*: authority {re.escape(repr(authority))} .* -> 400",
                         server_log(caplog))
        await open_and_echo(peer, 3, upstream_authority(path))
    finally:
        await peer.close()
    await still_serves(path)


async def test_authority_ip_other_than_the_destination_answers_400(path: Path, ca: CertificateAuthority,
                                                                   client_cert: WorkloadCertificate,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """127.0.0.2 is reachable on Linux loopback: without the check the server would connect there."""
    upstream_hits = path.server.stats["accepted"]
    peer = await TlsH2Peer.connect(path.server.address, client_context(client_cert, ca.trust_bundle))
    try:
        peer.conn.send_headers(1, connect_headers(f"127.0.0.2:{path.upstream[1]}"))
        await peer.flush()
        assert await peer.response(1) == 400
        assert path.server.stats["rejected_request"] == 1
        assert path.server.stats["accepted"] == upstream_hits
        assert (f"authority 127.0.0.2:{path.upstream[1]} is not this connection's destination 127.0.0.1 -> 400"
                in server_log(caplog))
        await open_and_echo(peer, 3, upstream_authority(path))
    finally:
        await peer.close()
    await still_serves(path)


async def _oversized_header_block(path: Path, ca: CertificateAuthority, client_cert: WorkloadCertificate) -> None:
    """A good stream mid-transfer on its own connection; a raw connection sends an oversized header block and
    is ended with GOAWAY; the good stream finishes byte-exact."""
    payload = os.urandom(512 * KIB)
    reader, writer = await asyncio.wait_for(path.open(), 5)
    try:
        writer.write(payload[:1000])
        assert await asyncio.wait_for(reader.readexactly(1000), 5) == payload[:1000]
        peer = await TlsH2Peer.connect(path.server.address, client_context(client_cert, ca.trust_bundle))
        try:
            peer.conn.send_headers(1, connect_headers(upstream_authority(path), (b"x-big", b"v" * (20 * KIB))))
            await peer.flush()
            ended = await peer.wait_for(lambda ev: isinstance(ev, h2.events.ConnectionTerminated))
            assert isinstance(ended, h2.events.ConnectionTerminated)
            assert ended.error_code == ErrorCodes.ENHANCE_YOUR_CALM
            assert peer.status(1) is None
            await peer.read_to_eof()
        finally:
            await peer.close()
        writer.write(payload[1000:])
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(-1), 5) == payload[1000:]
    finally:
        writer.close()
    assert path.server.stats["accepted"] == 1


async def test_oversized_header_block_ends_that_connection_only(path: Path, ca: CertificateAuthority,
                                                                client_cert: WorkloadCertificate) -> None:
    await _oversized_header_block(path, ca, client_cert)
    await eventually(lambda: len(path.server.tunnels) == 1, "the raw tunnel gone, the pooled one left")
    await still_serves(path)


async def test_oversized_header_block_is_logged(path: Path, ca: CertificateAuthority,
                                                client_cert: WorkloadCertificate,
                                                caplog: pytest.LogCaptureFixture) -> None:
    await _oversized_header_block(path, ca, client_cert)
    assert re.search(r"HBONE from .*(?i:header)", server_log(caplog)), server_log(caplog)


async def test_more_streams_than_allowed_only_the_excess_is_refused(path: Path, ca: CertificateAuthority,
                                                                    client_cert: WorkloadCertificate) -> None:
    path.server.settings = Settings(max_concurrent_streams=4)  # read per connection; no connection yet
    peer = await TlsH2Peer.connect(path.server.address, client_context(client_cert, ca.trust_bundle),
                                   ignore_limit=True)
    try:
        for stream_id in (1, 3, 5, 7, 9):
            peer.conn.send_headers(stream_id, connect_headers(upstream_authority(path)))
        await peer.flush()
        reset = await peer.wait_for(lambda ev: isinstance(ev, h2.events.StreamReset))
        assert isinstance(reset, h2.events.StreamReset)
        assert (reset.stream_id, reset.error_code) == (9, ErrorCodes.REFUSED_STREAM)
        assert [await peer.response(s) for s in (1, 3, 5, 7)] == [200] * 4
        payloads = {s: os.urandom(16 * KIB + s) for s in (1, 3, 5, 7)}  # 64 KiB + 16: past h2's default window
        for stream_id, payload in payloads.items():
            peer.conn.send_data(stream_id, payload, end_stream=True)
        await peer.flush()
        for stream_id, payload in payloads.items():
            assert await peer.body(stream_id) == payload
        assert [ev.stream_id for ev in peer.events if isinstance(ev, h2.events.StreamReset)] == [9]
        assert path.server.stats["accepted"] == 4
        await open_and_echo(peer, 11, upstream_authority(path))  # room again once those ended
    finally:
        await peer.close()
    await still_serves(path)


async def test_policy_denials_do_not_wear_out_the_pooled_connection(ca: CertificateAuthority,
                                                                    client_cert: WorkloadCertificate,
                                                                    server_cert: WorkloadCertificate) -> None:
    deny = True

    def policy(_request: InboundRequest) -> str | None:
        return "denied by test policy" if deny else None

    async with hbone_path(ca, client_cert, server_cert, policy=policy) as path:
        path.server.settings = Settings(max_concurrent_streams=4)
        for attempt in range(6):
            reader, writer = await asyncio.wait_for(path.open(), 5)
            try:
                with pytest.raises(ConnectionResetError):
                    await asyncio.wait_for(reader.read(-1), 1.5)
            except BaseException as e:
                raise AssertionError(f"denial {attempt + 1} was not answered with a reset") from e
            finally:
                writer.close()
        assert path.server.stats["denied"] == 6
        deny = False
        await still_serves(path)
