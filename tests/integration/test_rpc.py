"""agent.rpc against grpc, the reference implementation, on real sockets: grpc's client calls RpcServer (unary and
server streaming, statuses, flow control past every window, deadlines, cancellation, a graceful stop) and
agent.rpc's Channel calls grpc's server (statuses, deadlines, more calls than the server's stream limit, an idle
connection closed, a server that goes away, a server of another name). Requests that are not gRPC, or not what the
method takes, are answered with a status naming what is wrong, each on its own, while a grpc client on the same
server keeps being served."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc.aio
import h2.config
import h2.connection
import h2.events
import pytest

from agent.identity import ca_pb2, ca_pb2_grpc
from agent.rpc import RpcError, StatusCode
from agent.rpc.client import Channel
from agent.rpc.server import Call, Method, RpcServer
from agent.rpc.wire import frame, request_headers
from agent.telemetry.observer_tls import OBSERVER_SERVER_NAME
from tests.conftest import ObserverTlsMaterial

CREATE = "/istio.v1.auth.IstioCertificateService/CreateCertificate"
COUNT = "/test.Stream/Count"
TIMEOUT = 10.0
EOF = grpc.aio.EOF  # type: ignore[attr-defined]  # (grpc-stubs lack it)


class Raw(bytes):
    """A reply that is already bytes."""

    def SerializeToString(self) -> bytes:
        return bytes(self)


class Service:
    """CreateCertificate answers by its csr: an echo, a status, a crash or a wait. Count streams ``n`` replies of
    ``size`` bytes (the request is "n size", "forever" for replies until cancelled)."""

    def __init__(self) -> None:
        self.cancelled = asyncio.Event()
        self.closed = asyncio.Event()  # a Count generator was closed
        self.peers: list[str] = []

    async def create(self, request: ca_pb2.IstioCertificateRequest, call: Call) -> ca_pb2.IstioCertificateResponse:
        self.peers.append(call.peer.transport)
        if request.csr == "deny":
            raise RpcError(StatusCode.PERMISSION_DENIED, "node \u2018a\u2019 may not: 100% sure")
        if request.csr == "crash":
            raise ValueError("a bug")
        if request.csr == "slow":
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        return ca_pb2.IstioCertificateResponse(cert_chain=[request.csr, call.metadata.get("authorization", "")])

    async def count(self, request: bytes, call: Call) -> AsyncIterator[Raw]:
        try:
            if request == b"forever":
                while True:
                    yield Raw(b"tick")
                    await asyncio.sleep(0.01)
            n, size = (int(x) for x in request.split())
            for i in range(n):
                yield Raw(bytes([i % 256]) * size)
        finally:
            self.closed.set()

    def methods(self) -> dict[str, Method]:
        return {CREATE: Method(ca_pb2.IstioCertificateRequest.FromString, unary=self.create),
                COUNT: Method(bytes, streaming=self.count)}


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Service, RpcServer, str]]:
    service = Service()
    server = RpcServer(service.methods())
    sock = str(tmp_path / "rpc.sock")
    await server.listen_unix(sock)
    yield service, server, sock
    await server.stop()


def counting(channel: grpc.aio.Channel) -> grpc.aio.UnaryStreamMultiCallable[bytes, bytes]:
    return channel.unary_stream(COUNT, bytes, bytes)


async def create(target: str, csr: str, within: float = TIMEOUT) -> ca_pb2.IstioCertificateResponse:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = ca_pb2_grpc.IstioCertificateServiceStub(channel)  # type: ignore[no-untyped-call]
        reply: ca_pb2.IstioCertificateResponse = await stub.CreateCertificate(
            ca_pb2.IstioCertificateRequest(csr=csr), metadata=(("authorization", "Bearer t"),), timeout=within)
        return reply


async def failed(target: str, csr: str, within: float = TIMEOUT) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await create(target, csr, within)
    return e.value


async def test_grpc_calls_unary_and_streaming_methods(served: tuple[Service, RpcServer, str]) -> None:
    service, _, sock = served
    assert list((await create(f"unix:{sock}", "csr")).cert_chain) == ["csr", "Bearer t"]
    async with grpc.aio.insecure_channel(f"unix:{sock}") as channel:
        replies = [r async for r in counting(channel)(b"3 10", timeout=TIMEOUT)]
        assert replies == [bytes([i]) * 10 for i in range(3)]
        assert [r async for r in counting(channel)(b"0 1", timeout=TIMEOUT)] == []  # Trailers-Only OK
    assert service.peers == ["unix"]


async def test_statuses_reach_the_client_and_a_crash_is_internal(served: tuple[Service, RpcServer, str]) -> None:
    _, _, sock = served
    denied = await failed(f"unix:{sock}", "deny")
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    assert denied.details() == "node \u2018a\u2019 may not: 100% sure"
    crash = await failed(f"unix:{sock}", "crash")
    assert crash.code() == grpc.StatusCode.INTERNAL and crash.details() == "the server failed: ValueError"
    async with grpc.aio.insecure_channel(f"unix:{sock}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await channel.unary_unary("/test.Nothing/Here", bytes, bytes)(b"", timeout=TIMEOUT)
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED and "unknown method /test.Nothing/Here" in (
            e.value.details() or "")
    assert (await create(f"unix:{sock}", "still")).cert_chain[0] == "still"


async def test_replies_beyond_every_flow_control_window_arrive_whole(served: tuple[Service, RpcServer, str]) -> None:
    _, _, sock = served
    n, size = 48, 256 * 1024  # 12 MiB: past the client's stream and connection windows many times over
    async with grpc.aio.insecure_channel(f"unix:{sock}") as channel:
        got = 0
        async for reply in counting(channel)(f"{n} {size}".encode(), timeout=30):
            assert reply == bytes([got % 256]) * size
            got += 1
            if got % 8 == 0:
                await asyncio.sleep(0.05)  # a slow reader: the server waits for its windows
        assert got == n


async def test_the_deadline_cancels_the_handler(served: tuple[Service, RpcServer, str]) -> None:
    service, _, sock = served
    e = await failed(f"unix:{sock}", "slow", within=0.3)
    assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    async with asyncio.timeout(5):
        await service.cancelled.wait()


async def test_a_client_cancelling_a_stream_closes_its_generator(served: tuple[Service, RpcServer, str]) -> None:
    service, _, sock = served
    async with grpc.aio.insecure_channel(f"unix:{sock}") as channel:
        call = counting(channel)(b"forever", timeout=TIMEOUT)
        assert await call.read() == b"tick"
        call.cancel()
        async with asyncio.timeout(5):
            await service.closed.wait()
        assert (await create(f"unix:{sock}", "next")).cert_chain[0] == "next"


async def test_stop_lets_calls_finish_within_the_grace_then_cancels(tmp_path: Path) -> None:
    service = Service()
    server = RpcServer(service.methods())
    sock = str(tmp_path / "s.sock")
    await server.listen_unix(sock)
    async with grpc.aio.insecure_channel(f"unix:{sock}") as channel:
        short = counting(channel)(b"2 10", timeout=TIMEOUT)
        endless = counting(channel)(b"forever", timeout=TIMEOUT)
        assert await endless.read() == b"tick"
        await server.stop(grace=0.5)
        assert [r async for r in short] == [bytes([0]) * 10, bytes([1]) * 10]
        with pytest.raises(grpc.aio.AioRpcError):
            while await endless.read() is not EOF:
                pass
    assert service.closed.is_set()
    e = await failed(f"unix:{sock}", "after", within=2)
    assert e.code() == grpc.StatusCode.UNAVAILABLE


# -- what is not a gRPC call, sent with h2 itself -------------------------------------------------------------------
@dataclass
class Exchange:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    trailers: dict[bytes, bytes] = field(default_factory=dict)
    body: bytes = b""
    end: str = ""  # what ended it

    def grpc_status(self) -> tuple[int, str]:
        final = self.trailers or self.headers
        assert b"grpc-status" in final, self
        return int(final[b"grpc-status"]), final.get(b"grpc-message", b"").decode()


async def raw_exchange(sock: str, headers: list[tuple[bytes, bytes]], body: bytes = b"", end: bool = True) -> Exchange:
    """One request on a fresh connection, sent with h2 as the test says; what came back."""
    reader, writer = await asyncio.open_unix_connection(sock)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    conn.send_headers(1, headers, end_stream=not body and end)
    if body:
        conn.send_data(1, body, end_stream=end)
    writer.write(conn.data_to_send())
    out = Exchange()
    try:
        async with asyncio.timeout(5):
            while not out.end:
                data = await reader.read(65536)
                if not data:
                    out.end = "connection closed"
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.ResponseReceived):
                        out.headers = dict(ev.headers or [])
                    elif isinstance(ev, h2.events.TrailersReceived):
                        out.trailers = dict(ev.headers or [])
                    elif isinstance(ev, h2.events.DataReceived):
                        out.body += ev.data or b""
                        conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    elif isinstance(ev, h2.events.StreamEnded | h2.events.StreamReset | h2.events.ConnectionTerminated):
                        out.end = type(ev).__name__
                writer.write(conn.data_to_send())
    finally:
        writer.close()
    return out


GRPC = request_headers("local", CREATE, scheme="http")
REQUEST = frame(ca_pb2.IstioCertificateRequest(csr="x").SerializeToString())


@pytest.mark.parametrize(("case", "headers", "body", "expect"), [
    ("GET", [(b":method", b"GET"), *GRPC[1:]], b"", (405, "method 'GET': gRPC is POST")),
    ("not application/grpc", [*GRPC[:5], (b"content-type", b"application/json")], REQUEST,
     (415, "content-type 'application/json' is not application/grpc")),
    ("gzip", [*GRPC, (b"grpc-encoding", b"gzip")], REQUEST, (12, "grpc-encoding 'gzip' is not supported")),
    ("a bad grpc-timeout", [*GRPC, (b"grpc-timeout", b"1 hour")], REQUEST, (3, "grpc-timeout '1 hour'")),
    ("compressed", GRPC, b"\x01" + REQUEST[1:], (13, "compressed, with no grpc-encoding negotiated")),
    ("oversized", GRPC, b"\x00\x00\x50\x00\x00", (8, "a message of 5242880 bytes exceeds the limit of 4194304")),
    ("two messages", GRPC, REQUEST * 2, (13, "more than one request message")),
    ("truncated", GRPC, REQUEST[:-1], (13, "a truncated request message")),
    ("no message", GRPC, b"", (13, "no request message")),
    ("unparsable", GRPC, frame(b"\xff\xff\xff"), (13, "the request message does not parse")),
])
async def test_what_is_not_a_call_is_answered_and_the_server_serves_on(
        served: tuple[Service, RpcServer, str], case: str, headers: list[tuple[bytes, bytes]], body: bytes,
        expect: tuple[int, str]) -> None:
    _, _, sock = served
    out = await raw_exchange(sock, headers, body)
    code, message = expect
    if code >= 400:
        assert out.headers == {b":status": str(code).encode(), b"content-type": b"text/plain; charset=utf-8"}
        assert message in out.body.decode()
    else:
        assert out.grpc_status()[0] == code and message in out.grpc_status()[1], (case, out)
    assert (await create(f"unix:{sock}", case)).cert_chain[0] == case


async def test_a_request_still_being_sent_when_refused_is_stopped(served: tuple[Service, RpcServer, str]) -> None:
    _, _, sock = served
    out = await raw_exchange(sock, GRPC, b"\x00\x00\x50\x00\x00" + b"x" * 1000, end=False)
    assert out.grpc_status()[0] == StatusCode.RESOURCE_EXHAUSTED


async def test_what_one_connection_may_have_sent_and_not_had_handled_is_bounded(
        served: tuple[Service, RpcServer, str]) -> None:
    """Received DATA is acknowledged at once: two streams each sending most of a 3 MiB message (neither over the
    message limit) pass the connection's bound together, and the stream that does is refused."""
    _, _, sock = served
    reader, writer = await asyncio.open_unix_connection(sock)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    size = 3 * 1024 * 1024
    left = {sid: b"\x00" + size.to_bytes(4, "big") + b"x" * (size - 1024) for sid in (1, 3)}
    for sid in left:
        conn.send_headers(sid, GRPC)
    statuses: dict[int, int] = {}
    try:
        async with asyncio.timeout(10):
            while not statuses:
                for sid, data in list(left.items()):
                    n = min(len(data), conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                    if n > 0:
                        conn.send_data(sid, data[:n])
                        left[sid] = data[n:]
                writer.write(conn.data_to_send())
                for ev in conn.receive_data(await reader.read(65536)):
                    if isinstance(ev, h2.events.ResponseReceived | h2.events.TrailersReceived):
                        statuses[ev.stream_id] = int(dict(ev.headers or [])[b"grpc-status"])
    finally:
        writer.close()
    assert list(statuses.values()) == [StatusCode.RESOURCE_EXHAUSTED]
    assert (await create(f"unix:{sock}", "after")).cert_chain[0] == "after"


async def test_bytes_that_are_not_http2_end_that_connection_only(served: tuple[Service, RpcServer, str]) -> None:
    _, _, sock = served
    reader, writer = await asyncio.open_unix_connection(sock)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    async with asyncio.timeout(5):
        while await reader.read(65536):
            pass  # the server's preface and GOAWAY, then the end
    writer.close()
    assert (await create(f"unix:{sock}", "after")).cert_chain[0] == "after"


# -- the client against grpc's server ----------------------------------------------------------------------------
class GrpcCa(ca_pb2_grpc.IstioCertificateServiceServicer):
    def __init__(self) -> None:
        self.in_flight = 0
        self.most = 0

    async def CreateCertificate(self, request: ca_pb2.IstioCertificateRequest,
                                context: grpc.aio.ServicerContext[object, object]) -> ca_pb2.IstioCertificateResponse:
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            if request.csr == "deny":
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown bearer token \u2717 (100%)")
            if request.csr.startswith("wait"):
                await asyncio.sleep(float(request.csr.split()[1]))
            token = dict(context.invocation_metadata() or ()).get("authorization", "")
            return ca_pb2.IstioCertificateResponse(cert_chain=[request.csr, str(token)])
        finally:
            self.in_flight -= 1


async def grpc_server(material: ObserverTlsMaterial, **options: int) -> tuple[grpc.aio.Server, GrpcCa, int]:
    servicer = GrpcCa()
    server = grpc.aio.server(options=list(options.items()))
    ca_pb2_grpc.add_IstioCertificateServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    files = material.server
    creds = grpc.ssl_server_credentials([(files.key.read_bytes(), files.cert.read_bytes())])
    port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    return server, servicer, port


def client_context(material: ObserverTlsMaterial) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(material.operator.cas[0]))
    context.set_alpn_protocols(["h2"])
    return context


async def ask(channel: Channel, csr: str, within: float = TIMEOUT) -> list[str]:
    reply = await channel.unary(CREATE, ca_pb2.IstioCertificateRequest(csr=csr).SerializeToString(),
                                metadata=[("authorization", "Bearer t")], timeout=within)
    return list(ca_pb2.IstioCertificateResponse.FromString(reply).cert_chain)


async def test_the_channel_calls_grpcs_server(observer_tls: ObserverTlsMaterial) -> None:
    server, _, port = await grpc_server(observer_tls)
    channel = Channel("127.0.0.1", port, client_context(observer_tls), server_hostname=OBSERVER_SERVER_NAME)
    try:
        assert await ask(channel, "csr") == ["csr", "Bearer t"]
        with pytest.raises(RpcError) as e:
            await ask(channel, "deny")
        assert e.value.code == StatusCode.UNAUTHENTICATED and e.value.details == "unknown bearer token \u2717 (100%)"
        with pytest.raises(RpcError) as e:
            await ask(channel, "wait 5", within=0.3)
        assert e.value.code == StatusCode.DEADLINE_EXCEEDED
        assert await ask(channel, "after") == ["after", "Bearer t"]
    finally:
        channel.close()
        await server.stop(None)


async def test_more_calls_than_the_servers_stream_limit_all_succeed(observer_tls: ObserverTlsMaterial) -> None:
    server, servicer, port = await grpc_server(observer_tls, **{"grpc.max_concurrent_streams": 4})
    channel = Channel("127.0.0.1", port, client_context(observer_tls), server_hostname=OBSERVER_SERVER_NAME)
    try:
        replies = await asyncio.gather(*(ask(channel, f"wait 0.05 {i}") for i in range(40)))
        assert [r[0] for r in replies] == [f"wait 0.05 {i}" for i in range(40)]
        assert servicer.most <= 4
    finally:
        channel.close()
        await server.stop(None)


async def test_an_idle_connection_is_closed_and_opened_again(observer_tls: ObserverTlsMaterial) -> None:
    server, _, port = await grpc_server(observer_tls)
    channel = Channel("127.0.0.1", port, client_context(observer_tls), server_hostname=OBSERVER_SERVER_NAME,
                      idle=0.2)
    try:
        assert await ask(channel, "one") == ["one", "Bearer t"]
        assert channel.connected
        async with asyncio.timeout(5):
            while channel.connected:  # noqa: ASYNC110 (polling is the point)
                await asyncio.sleep(0.05)
        assert await ask(channel, "two") == ["two", "Bearer t"]
    finally:
        channel.close()
        await server.stop(None)


async def test_a_server_gone_or_of_another_name_is_unavailable(observer_tls: ObserverTlsMaterial) -> None:
    server, _, port = await grpc_server(observer_tls)
    context = client_context(observer_tls)
    impostor = Channel("127.0.0.1", port, context, server_hostname="ambit-ca.ambit-system.svc")
    channel = Channel("127.0.0.1", port, context, server_hostname=OBSERVER_SERVER_NAME)
    try:
        with pytest.raises(RpcError) as e:
            await ask(impostor, "x")
        assert e.value.code == StatusCode.UNAVAILABLE and "cannot connect" in e.value.details
        slow = asyncio.ensure_future(ask(channel, "wait 5"))
        await asyncio.sleep(0.3)
        await server.stop(None)
        with pytest.raises(RpcError) as e:
            await slow
        assert e.value.code == StatusCode.UNAVAILABLE
        with pytest.raises(RpcError) as e:
            await ask(channel, "x")
        assert e.value.code == StatusCode.UNAVAILABLE and "cannot connect to 127.0.0.1" in e.value.details
    finally:
        impostor.close()
        channel.close()


async def test_a_wildcard_listener_takes_both_families_as_grpc_binds_it(observer_tls: ObserverTlsMaterial) -> None:
    server = RpcServer(Service().methods())
    port = await server.listen_tls("0.0.0.0", 0, observer_tls.server_tls().listener_context())
    op = observer_tls.operator
    try:
        for target in (f"127.0.0.1:{port}", f"[::1]:{port}"):
            async with grpc.aio.secure_channel(target, op.credentials(), options=op.options()) as channel:
                stub = ca_pb2_grpc.IstioCertificateServiceStub(channel)  # type: ignore[no-untyped-call]
                reply = await stub.CreateCertificate(ca_pb2.IstioCertificateRequest(csr=target), timeout=TIMEOUT)
                assert reply.cert_chain[0] == target
    finally:
        await server.stop()
