"""hbone.protocol without sockets: bytes pumped between a ClientConnection and a ServerConnection, or between a
ServerConnection and a raw h2 client that breaks the rules (tests.fixtures.h2peer)."""

from __future__ import annotations

import os
import re
import sys
import types
from collections.abc import Mapping, Sequence
from typing import TypeVar

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
from h2.errors import ErrorCodes

from hbone.authority import Authority
from hbone.events import (
    ConnectionEnded,
    ConnectRequest,
    ConnectResponse,
    Data,
    RequestRejected,
    StreamEnded,
    StreamReset,
    WindowOpened,
)
from hbone.protocol import KIB, MIB, ClientConnection, ServerConnection, Settings
from tests.fixtures.h2peer import connect_headers, raw_client, status_of

Endpoint = ClientConnection | ServerConnection | h2.connection.H2Connection
T = TypeVar("T")

TARGET = Authority("10.0.0.1", 80)


def _feed(side: Endpoint, data: bytes) -> list[object]:
    if isinstance(side, h2.connection.H2Connection):
        return list(side.receive_data(data))
    return list(side.receive(data))


def pump(a: Endpoint, b: Endpoint) -> tuple[list[object], list[object]]:
    """Move bytes both ways until neither side has anything to send; returns (events at a, events at b)."""
    at_a: list[object] = []
    at_b: list[object] = []
    for _ in range(1000):
        a_out, b_out = a.data_to_send(), b.data_to_send()
        if not a_out and not b_out:
            return at_a, at_b
        if a_out:
            at_b += _feed(b, a_out)
        if b_out:
            at_a += _feed(a, b_out)
    raise AssertionError("the two sides never went quiet")


def only(events: Sequence[object], kind: type[T]) -> list[T]:
    return [ev for ev in events if isinstance(ev, kind)]


def open_stream(client: ClientConnection, authority: Authority = TARGET,
                headers: Mapping[str, str] | None = None) -> int:
    """CONNECT sent; the stream's id (the connection can open one)."""
    stream_id = client.open(authority, headers)
    assert stream_id is not None
    return stream_id


def connected(settings: Settings = Settings()) -> tuple[ClientConnection, ServerConnection]:
    client, server = ClientConnection(), ServerConnection(settings)
    pump(client, server)
    return client, server


def tunnel(client: ClientConnection, server: ServerConnection, authority: Authority = TARGET) -> int:
    """An established stream: CONNECT sent, 200 received."""
    stream_id = open_stream(client, authority)
    _, at_server = pump(client, server)
    assert [r.stream_id for r in only(at_server, ConnectRequest)] == [stream_id]
    server.accept(stream_id)
    at_client, _ = pump(client, server)
    assert [(r.stream_id, r.status) for r in only(at_client, ConnectResponse)] == [(stream_id, 200)]
    return stream_id


def received(events: list[object], stream_id: int) -> tuple[bytes, int]:
    """The bytes and the flow-controlled length delivered on ``stream_id``."""
    data = [d for d in only(events, Data) if d.stream_id == stream_id]
    return b"".join(d.data for d in data), sum(d.flow_length for d in data)


def raw_connected(settings: Settings = Settings(), *, ignore_limit: bool = False,
                  ) -> tuple[h2.connection.H2Connection, ServerConnection, list[object]]:
    raw, server = raw_client(ignore_limit=ignore_limit), ServerConnection(settings)
    at_raw, _ = pump(raw, server)
    return raw, server, at_raw


# -- CONNECT and answers


def test_connect_request_carries_parsed_authority_and_headers() -> None:
    client, server = connected()
    headers = {"forwarded": 'for="10.1.2.3:40000"', "baggage": "k8s.namespace.name=default",
               "traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-00"}
    stream_id = open_stream(client, Authority("10.0.0.7", 8080), headers)
    _, at_server = pump(client, server)
    [request] = only(at_server, ConnectRequest)
    assert request.stream_id == stream_id == 1
    assert request.authority == Authority("10.0.0.7", 8080)
    assert request.headers[":method"] == "CONNECT"
    assert request.headers[":authority"] == "10.0.0.7:8080"
    for name, value in headers.items():
        assert request.headers[name] == value
    assert ":path" not in request.headers and ":scheme" not in request.headers  # plain CONNECT (RFC 9113 §8.5)


def test_per_stream_headers_stay_out_of_both_hpack_tables_and_the_authority_is_reused() -> None:
    """traceparent and forwarded are new on every stream: sent never-indexed, so neither table fills with them;
    the :authority, the same for a target, is indexed and costs one byte on the next stream."""
    client, server = connected()
    sizes = []
    for port in (40000, 40001):
        open_stream(client, TARGET, {"forwarded": f'for="10.1.2.3:{port}"', "traceparent": "00-" + "a" * 32 + "-"
                                     + f"{port:016x}" + "-00"})
        out = client.data_to_send()
        sizes.append(len(out))
        [request] = only(server.receive(out), ConnectRequest)
        assert request.headers["forwarded"] == f'for="10.1.2.3:{port}"'
    for table in (client._h2.encoder.header_table, server._h2.decoder.header_table):
        names = [name for name, _ in table.dynamic_entries]
        assert b":authority" in names and b"traceparent" not in names and b"forwarded" not in names
    assert sizes[1] < sizes[0]  # the :authority came from the table the second time


@pytest.mark.parametrize(("name", "value"), [("Forwarded", "x"), ("connection", "close"), ("bad name", "x"),
                                             ("baggage", "a\r\nb"), ("baggage", " padded")])
def test_a_request_header_h2_does_not_allow_is_refused_with_its_name(name: str, value: str) -> None:
    client, _ = connected()
    with pytest.raises(ValueError, match=re.escape(repr(name))):
        client.open(TARGET, {name: value})
    assert client.open(TARGET, {"baggage": "k=v"}) == 1  # nothing was sent for the refused one
    with pytest.raises(ValueError, match=re.escape(repr(name))):  # (checked names are remembered: good ones only)
        client.open(TARGET, {name: value})


def test_streams_opened_answered_and_ended_on_the_short_paths_are_closed_for_h2_as_well() -> None:
    """The 200 and both END_STREAMs are written and read by this layer with h2 taking the state transitions:
    every stream ends closed on both sides, nothing counts as open, and the limit never fills."""
    client, server = connected(Settings(max_concurrent_streams=5))
    for _ in range(20):  # four times the limit, one after the other
        stream_id = open_stream(client)
        pump(client, server)
        server.accept(stream_id)
        at_client, _ = pump(client, server)
        assert at_client == [ConnectResponse(stream_id, 200, {":status": "200"})]
        assert client.send(stream_id, b"ping") == 4
        client.end(stream_id)
        _, at_server = pump(client, server)
        assert [type(ev) for ev in at_server] == [Data, StreamEnded]
        server.end(stream_id)
        at_client, _ = pump(client, server)
        assert at_client == [StreamEnded(stream_id)]
        for side in (client, server):
            assert side._h2.streams[stream_id].closed
        assert client.open_streams == server.open_streams == 0


def _closed_both_ways(client: ClientConnection, server: ServerConnection, stream_id: int) -> None:
    server.accept(stream_id)
    client.end(stream_id)
    server.end(stream_id)
    pump(client, server)


@pytest.mark.parametrize("limit", [5, 40, 200])
def test_the_peers_stream_limit_holds_exactly_and_closed_streams_do_not_pile_up(limit: int) -> None:
    """Open streams are counted only when they could reach the limit (h2 counts by walking every stream): the limit
    still refuses exactly the stream past it, whatever the closed streams in h2's table meanwhile, and neither
    side's table holds more closed streams than about the open ones (h2 left a server's to fill to its limit)."""
    client, server = connected(Settings(max_concurrent_streams=limit))
    held = [open_stream(client) for _ in range(limit - 1)]
    pump(client, server)
    for round_ in range(3 * limit + 50):  # one slot left: cycled many times over beside the held streams
        stream_id = open_stream(client)
        pump(client, server)
        if round_ % 7 == 0:  # the limit is reached now: one more is refused
            assert client.open(TARGET) is None, f"stream {limit + 1} of {limit} opened"
        _closed_both_ways(client, server, stream_id)
        assert len(client._h2.streams) <= 2 * limit + 16
        assert len(server._h2.streams) <= 2 * limit + 16
    for stream_id in held:
        _closed_both_ways(client, server, stream_id)
    assert [open_stream(client) for _ in range(limit)]
    assert client.open(TARGET) is None
    assert client.open_streams == limit


def test_a_server_keeps_few_closed_streams_one_after_another() -> None:
    """Streams opened and closed one after another: the server's h2 table stays small (it held up to its
    concurrency limit of closed streams, and the collector traversed them all)."""
    client, server = connected(Settings(max_concurrent_streams=200))
    for _ in range(300):
        _closed_both_ways(client, server, tunnel(client, server))
        assert len(server._h2.streams) <= 17 and len(client._h2.streams) <= 17


def test_a_200_after_the_peer_resized_the_header_table_carries_the_table_size_update() -> None:
    """RFC 7541 §4.2: the first header block after a table size change starts with the update; the one-byte
    200 cannot carry it, so h2 encodes that answer."""
    raw, server, _ = raw_connected()
    raw.update_settings({h2.settings.SettingCodes.HEADER_TABLE_SIZE: 1024})
    raw.send_headers(1, connect_headers("10.0.0.1:80"))
    [request] = only(pump(raw, server)[1], ConnectRequest)
    server.accept(request.stream_id)
    out = server.data_to_send()
    assert out[3] == 0x1 and out[9] & 0xE0 == 0x20  # HEADERS whose block starts with a size update
    assert status_of(list(raw.receive_data(out)), 1) == 200


def test_a_header_block_larger_than_a_frame_is_sent_as_headers_and_continuations() -> None:
    """Before the server's SETTINGS the client may send frames of 16 KiB only: a larger block is split."""
    client = ClientConnection()
    raw = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    raw.initiate_connection()
    raw.local_settings.max_header_list_size = 1 << 20
    big = "k=" + "v" * 40_000
    stream_id = open_stream(client, TARGET, {"baggage": big})
    out = client.data_to_send()
    frames, at = [], 24  # after the client preface: (type, flags, length) of each frame
    while at < len(out):
        length = int.from_bytes(out[at:at + 3], "big")
        frames.append((out[at + 3], out[at + 4], length))
        at += 9 + length
    blocks = [(kind, flags) for kind, flags, length in frames if kind in (0x1, 0x9)]
    assert blocks == [(0x1, 0x0), (0x9, 0x0), (0x9, 0x4)]  # HEADERS, CONTINUATION, CONTINUATION + END_HEADERS
    assert max(length for _, _, length in frames) <= 16384
    events = raw.receive_data(out)
    [request] = [ev for ev in events if isinstance(ev, h2.events.RequestReceived)]
    assert request.stream_id == stream_id and dict(request.headers or [])[b"baggage"] == big.encode()


def test_accept_answers_200() -> None:
    client, server = connected()
    stream_id = open_stream(client)
    pump(client, server)
    server.accept(stream_id)
    at_client, _ = pump(client, server)
    assert at_client == [ConnectResponse(stream_id, 200, {":status": "200"})]  # no END_STREAM: the tunnel is open


@pytest.mark.parametrize("status", [401, 503])
def test_final_answer_ends_the_stream(status: int) -> None:
    client, server = connected()
    stream_id = open_stream(client)
    pump(client, server)
    server.respond(stream_id, status)
    at_client, _ = pump(client, server)
    assert at_client[:2] == [ConnectResponse(stream_id, status, {":status": str(status)}), StreamEnded(stream_id)]
    assert all(isinstance(ev, StreamReset) and ev.error_code == ErrorCodes.NO_ERROR for ev in at_client[2:])


@pytest.mark.parametrize("answer", ["respond 401", "respond 503", "bad method 400"])
def test_a_rejected_stream_gives_its_slot_back(answer: str) -> None:
    """With room for one stream, a rejected request must not block the next one."""
    one = Settings(max_concurrent_streams=1)
    raw, server, _ = raw_connected(one)
    status = int(answer.rsplit(maxsplit=1)[-1])
    if answer == "bad method 400":
        raw.send_headers(1, connect_headers("10.0.0.1:80", (b":scheme", b"https"), (b":path", b"/"),
                                            method=b"GET"))
    else:
        raw.send_headers(1, connect_headers("10.0.0.1:80"))
        pump(raw, server)
        server.respond(1, status)
    at_raw, _ = pump(raw, server)
    assert status_of(at_raw, 1) == status
    assert server.open_streams == 0, "the answered stream still counts against MAX_CONCURRENT_STREAMS"
    raw.send_headers(3, connect_headers("10.0.0.1:80"))
    at_raw, at_server = pump(raw, server)
    assert [r.stream_id for r in only(at_server, ConnectRequest)] == [3]
    assert not only(at_raw, h2.events.StreamReset)


def test_non_connect_method_answers_400() -> None:
    raw, server, _ = raw_connected()
    raw.send_headers(1, connect_headers("10.0.0.1:80", (b":scheme", b"https"), (b":path", b"/"), method=b"GET"),
                     end_stream=True)
    at_raw, at_server = pump(raw, server)
    assert status_of(at_raw, 1) == 400
    assert any(isinstance(ev, h2.events.StreamEnded) and ev.stream_id == 1 for ev in at_raw)
    [rejected] = only(at_server, RequestRejected)
    assert (rejected.stream_id, rejected.status) == (1, 400)
    assert "'GET'" in rejected.reason and "CONNECT" in rejected.reason
    assert not only(at_server, ConnectRequest)


def test_extended_connect_answers_400() -> None:
    raw, server, _ = raw_connected()
    raw.send_headers(1, connect_headers("10.0.0.1:80", (b":protocol", b"websocket"), (b":scheme", b"https"),
                                        (b":path", b"/")))
    at_raw, at_server = pump(raw, server)
    assert status_of(at_raw, 1) == 400
    [rejected] = only(at_server, RequestRejected)
    assert rejected.status == 400 and "extended CONNECT" in rejected.reason
    assert not only(at_server, ConnectRequest)


@pytest.mark.parametrize("authority", [
    "10.0.0.1",  # no port
    "10.0.0.1:",  # empty port
    "example.com:80",  # a hostname, not an IP
    "10.0.0.1:0",
    "10.0.0.1:70000",
    "10.0.0.1:-1",
    "",
    "[::1]",  # IPv6 without a port
    "fe80::1:80",  # IPv6 needs brackets (RFC 3986 §3.2.2); this one is ambiguous
    "[10.0.0.1]:80",  # brackets are for IPv6 only
    "10.0.0.1:\uff18\uff10",  # fullwidth digits
    "10.0.0.1:\u00b2",  # a superscript digit
])
def test_malformed_authority_answers_400_naming_it(authority: str) -> None:
    raw, server, _ = raw_connected()
    raw.send_headers(1, connect_headers(authority))
    at_raw, at_server = pump(raw, server)
    assert not only(at_server, ConnectRequest), f"{authority!r} was accepted"
    assert status_of(at_raw, 1) == 400
    [rejected] = only(at_server, RequestRejected)
    assert rejected.status == 400
    assert f"authority {authority!r}" in rejected.reason


@pytest.mark.parametrize(("authority", "why"), [
    ("[fd00::1:80", "has '[' without its closing ']'"),
    ("[fd00::1]80", "must be [ipv6]:port: ']' is not followed by ':port'"),
    ("[fd00::1]:", "has no port number after its last ':'"),
    ("[fd00::1]", "must be [ipv6]:port: ']' is not followed by ':port'"),
    ("fd00", "has no ':port'"),
    ("fd00::1]:80", "has ']' without '['"),
    ("fd00::1:80", "is IPv6 without brackets: write [ipv6]:port"),
    ("[fe80::1%eth0]:80", "names an IPv6 zone"),
    ("[10.0.0.1]:80", "does not name an IP address: brackets hold an IPv6 address only"),
    ("[fd00::1::2]:80", "does not name an IP address"),
    ("[]:80", "is not ip:port (or [ipv6]:port)"),
    ("[fd00::1]:0", "has port out of range"),
])
def test_a_malformed_ipv6_authority_is_rejected_saying_what_is_wrong(authority: str, why: str) -> None:
    with pytest.raises(ValueError) as raised:
        Authority.parse(authority)
    assert str(raised.value).startswith(f"authority {authority!r} {why}"), raised.value


@pytest.mark.parametrize(("text", "ip", "port"), [
    ("[fd00::1]:8080", "fd00::1", 8080),
    ("[FD00:0200:0001::0011]:80", "fd00:200:1::11", 80),    # normalised: compared with the socket's address
    ("[::1]:65535", "::1", 65535),
    ("[::ffff:10.0.0.1]:80", "::ffff:a00:1", 80),          # kept IPv6: it is not the IPv4 destination (ztunnel)
])
def test_ipv6_authority_round_trip(text: str, ip: str, port: int) -> None:
    authority = Authority.parse(text)
    assert authority == Authority(ip, port)
    assert str(authority) == f"[{ip}]:{port}" and Authority.parse(str(authority)) == authority


def test_an_ipv6_connect_carries_a_bracketed_authority_both_ways() -> None:
    client, server = connected()
    stream_id = open_stream(client, Authority("fd00:200:1::11", 8080))
    at_server = pump(client, server)[1]
    [request] = only(at_server, ConnectRequest)
    assert request.stream_id == stream_id and request.authority == Authority("fd00:200:1::11", 8080)
    assert request.headers[":authority"] == "[fd00:200:1::11]:8080"


def test_authority_parse_bounds() -> None:
    for bad in ("10.0.0.1", "example.com:80", "10.0.0.1:65536"):
        with pytest.raises(ValueError, match=re.escape(f"authority {bad!r}")):
            Authority.parse(bad)
    assert Authority.parse("10.0.0.1:65535") == Authority("10.0.0.1", 65535)
    assert Authority.parse("10.0.0.1:1") == Authority("10.0.0.1", 1)


def test_a_remembered_authority_is_the_same_and_a_bad_one_is_refused_every_time() -> None:
    first = Authority.parse("10.9.8.7:8080")
    assert Authority.parse("10.9.8.7:8080") is first  # from the cache: same value, no second parse
    for _ in range(2):
        with pytest.raises(ValueError, match="port out of range"):
            Authority.parse("10.9.8.7:0")


def test_ipv6_authority_parses_and_round_trips() -> None:
    parsed = Authority.parse("[::1]:80")
    assert parsed == Authority("::1", 80)
    assert str(parsed) == "[::1]:80"
    assert Authority.parse("[2001:DB8:0::0001]:443") == Authority("2001:db8::1", 443)  # normalised
    client, server = connected()
    stream_id = open_stream(client, parsed)
    _, at_server = pump(client, server)
    [request] = only(at_server, ConnectRequest)
    assert request.stream_id == stream_id
    assert request.authority == parsed
    assert request.headers[":authority"] == "[::1]:80"


# -- data, flow control, half-close, reset


def test_data_both_ways_within_windows_and_ack_reopens_them() -> None:
    client, server = connected()
    stream_id = tunnel(client, server)
    up = os.urandom(5 * MIB)
    assert client.window(stream_id) == 4 * MIB
    assert client.send(stream_id, up) == 4 * MIB  # the stream window, not all of it
    assert client.send(stream_id, up[4 * MIB:]) == 0
    _, at_server = pump(client, server)
    got, flow = received(at_server, stream_id)
    assert got == up[:4 * MIB] and flow == 4 * MIB
    assert all(len(d.data) <= MIB for d in only(at_server, Data))  # 1 MiB frames
    assert client.window(stream_id) == 0
    server.ack(stream_id, flow)
    at_client, _ = pump(client, server)
    assert WindowOpened(stream_id) in at_client
    assert client.window(stream_id) == 4 * MIB
    assert client.send(stream_id, up[4 * MIB:]) == MIB
    _, at_server = pump(client, server)
    assert received(at_server, stream_id)[0] == up[4 * MIB:]

    down = os.urandom(4 * MIB + 1)  # the client's stream window is 4 MiB too
    assert server.send(stream_id, down) == 4 * MIB
    at_client, _ = pump(client, server)
    got, flow = received(at_client, stream_id)
    assert got == down[:4 * MIB]
    assert server.send(stream_id, down[4 * MIB:]) == 0
    client.ack(stream_id, flow)
    _, at_server = pump(client, server)
    assert WindowOpened(stream_id) in at_server
    assert server.send(stream_id, down[4 * MIB:]) == 1
    at_client, _ = pump(client, server)
    assert received(at_client, stream_id)[0] == down[4 * MIB:]


def test_data_sent_right_behind_a_connect_reaches_the_server_before_its_answer() -> None:
    """RFC 9113 §8.5: DATA may follow the CONNECT's HEADERS; the server holds it for the stream it has not answered
    yet (its upstream is being connected), and the 200 then opens the way back."""
    client, server = connected()
    stream_id = open_stream(client)
    assert client.window(stream_id) == 4 * MIB
    assert client.send(stream_id, b"GET / HTTP/1.1\r\n\r\n") == 18
    client.end(stream_id)
    out = client.data_to_send()
    frames, at = [], 0
    while at < len(out):
        length = int.from_bytes(out[at:at + 3], "big")
        frames.append((out[at + 3], int.from_bytes(out[at + 5:at + 9], "big") & 0x7FFFFFFF))
        at += 9 + length
    assert frames == [(0x1, stream_id), (0x0, stream_id), (0x0, stream_id)]  # HEADERS, DATA, END_STREAM: one write
    at_server = _feed(server, out)
    assert [type(ev).__name__ for ev in at_server] == ["ConnectRequest", "Data", "StreamEnded"]
    assert received(at_server, stream_id)[0] == b"GET / HTTP/1.1\r\n\r\n"
    server.accept(stream_id)
    assert server.send(stream_id, b"HTTP/1.1 200 OK\r\n\r\n") == 19
    at_client, _ = pump(client, server)
    assert [(r.stream_id, r.status) for r in only(at_client, ConnectResponse)] == [(stream_id, 200)]
    assert received(at_client, stream_id)[0] == b"HTTP/1.1 200 OK\r\n\r\n"


def test_data_sent_before_a_refusal_is_dropped_and_the_stream_can_send_no_more() -> None:
    client, server = connected()
    stream_id = open_stream(client)
    assert client.send(stream_id, b"early") == 5
    _, at_server = pump(client, server)
    assert received(at_server, stream_id)[0] == b"early"
    server.respond(stream_id, 401)
    at_client, _ = pump(client, server)
    assert [(r.stream_id, r.status) for r in only(at_client, ConnectResponse)] == [(stream_id, 401)]
    client.reset(stream_id)
    assert client.window(stream_id) == 0 and client.send(stream_id, b"more") == 0


def test_data_arriving_after_its_stream_was_refused_is_dropped_and_the_connection_serves_on() -> None:
    """DATA sent behind a CONNECT may reach the server after its refusal (a later read): that stream's data is
    dropped, the connection is not failed, and the next stream is served."""
    client, server = connected()
    stream_id = open_stream(client)
    headers = client.data_to_send()
    assert client.send(stream_id, b"e" * 16000) == 16000
    data = client.data_to_send()
    assert [type(ev) for ev in _feed(server, headers)] == [ConnectRequest]
    server.respond(stream_id, 401)
    assert _feed(server, data) == []
    assert server.closed is None
    at_client, _ = pump(client, server)
    assert [(r.stream_id, r.status) for r in only(at_client, ConnectResponse)] == [(stream_id, 401)]
    following = open_stream(client)
    assert client.send(following, b"next") == 4
    _, at_server = pump(client, server)
    assert [r.stream_id for r in only(at_server, ConnectRequest)] == [following]
    assert received(at_server, following)[0] == b"next"


def test_connection_window_is_16_mib() -> None:
    client, server = connected()
    streams = [tunnel(client, server) for _ in range(5)]
    chunk = b"x" * (4 * MIB)
    assert [client.send(s, chunk) for s in streams] == [4 * MIB] * 4 + [0]  # 4 x 4 MiB fill the connection
    _, at_server = pump(client, server)
    server.ack(streams[0], received(at_server, streams[0])[1])
    at_client, _ = pump(client, server)
    assert WindowOpened(0) in at_client
    assert client.send(streams[4], chunk) == 4 * MIB


def test_end_stream_is_a_half_close_both_ways() -> None:
    client, server = connected()
    stream_id = tunnel(client, server)
    client.send(stream_id, b"request")
    client.end(stream_id)
    _, at_server = pump(client, server)
    assert received(at_server, stream_id)[0] == b"request"
    assert only(at_server, StreamEnded) == [StreamEnded(stream_id)]
    # the other direction still flows after the client's FIN
    assert server.send(stream_id, b"answer") == 6
    at_client, _ = pump(client, server)
    assert received(at_client, stream_id)[0] == b"answer"
    assert not only(at_client, StreamEnded)
    server.end(stream_id)
    at_client, _ = pump(client, server)
    assert only(at_client, StreamEnded) == [StreamEnded(stream_id)]
    assert client.open_streams == server.open_streams == 0


@pytest.mark.parametrize("who", ["client", "server"])
def test_reset_is_connect_error(who: str) -> None:
    client, server = connected()
    stream_id = tunnel(client, server)
    resetter: ClientConnection | ServerConnection = client if who == "client" else server
    resetter.reset(stream_id)
    resetter.reset(stream_id)  # twice is harmless
    at_client, at_server = pump(client, server)
    at_peer = at_server if who == "client" else at_client
    assert only(at_peer, StreamReset) == [StreamReset(stream_id, ErrorCodes.CONNECT_ERROR, refused=False)]
    assert int(ErrorCodes.CONNECT_ERROR) == 0xA
    assert client.open_streams == server.open_streams == 0


# -- settings and the stream limit


def test_settings_advertised() -> None:
    raw, _, at_raw = raw_connected()
    [changed] = only(at_raw, h2.events.RemoteSettingsChanged)
    codes = h2.settings.SettingCodes
    advertised = {code: s.new_value for code, s in changed.changed_settings.items()}
    assert advertised[codes.INITIAL_WINDOW_SIZE] == 4 * MIB
    assert advertised[codes.MAX_FRAME_SIZE] == MIB
    assert advertised[codes.MAX_CONCURRENT_STREAMS] == 200
    assert advertised[codes.MAX_HEADER_LIST_SIZE] == 16 * KIB
    window = [ev.delta for ev in only(at_raw, h2.events.WindowUpdated) if ev.stream_id == 0]
    assert 65535 + sum(window) == 16 * MIB  # connection window, from the default 65535
    assert raw.outbound_flow_control_window == 16 * MIB

    client, _ = connected()
    assert client.peer_stream_limit == 200
    raw_server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    raw_server.initiate_connection()
    client = ClientConnection()
    _, at_raw_server = pump(client, raw_server)
    [changed] = only(at_raw_server, h2.events.RemoteSettingsChanged)
    advertised = {code: s.new_value for code, s in changed.changed_settings.items()}
    assert advertised[codes.ENABLE_PUSH] == 0
    assert advertised[codes.INITIAL_WINDOW_SIZE] == 4 * MIB
    assert raw_server.outbound_flow_control_window == 16 * MIB


def test_excess_stream_is_refused_alone_and_hpack_stays_in_sync() -> None:
    """A client ignoring MAX_CONCURRENT_STREAMS loses only the excess stream (RFC 9113 §5.1.2); the refused
    header block is still decoded, so a later block that refers to its HPACK entries decodes right."""
    raw, server, _ = raw_connected(ignore_limit=True)
    for i in range(200):
        raw.send_headers(2 * i + 1, connect_headers("10.0.0.1:80"))
    at_raw, at_server = pump(raw, server)
    assert len(only(at_server, ConnectRequest)) == 200
    assert not only(at_raw, h2.events.StreamReset)

    probe = (b"x-probe", os.urandom(16).hex().encode())  # a new header: the encoder adds it to its table
    raw.send_headers(401, connect_headers("10.0.0.1:80", probe))
    raw.send_data(401, b"sent before the refusal arrived")
    at_raw, at_server = pump(raw, server)
    assert [(ev.stream_id, ev.error_code) for ev in only(at_raw, h2.events.StreamReset)] == [
        (401, ErrorCodes.REFUSED_STREAM)]
    assert not only(at_server, ConnectRequest)
    assert not only(at_raw, h2.events.ConnectionTerminated) and server.closed is None

    server.accept(1)  # the earlier streams keep working
    raw.send_data(1, b"ping")
    at_raw, at_server = pump(raw, server)
    assert status_of(at_raw, 1) == 200
    assert received(at_server, 1)[0] == b"ping"
    server.accept(399)
    server.send(399, b"pong")
    at_raw, _ = pump(raw, server)
    assert status_of(at_raw, 399) == 200
    assert [ev.data for ev in only(at_raw, h2.events.DataReceived) if ev.stream_id == 399] == [b"pong"]

    raw.reset_stream(1)  # make room, then reuse the refused stream's header
    raw.send_headers(403, connect_headers("10.0.0.1:80", probe))
    at_raw, at_server = pump(raw, server)
    [request] = only(at_server, ConnectRequest)
    assert request.stream_id == 403
    assert request.headers["x-probe"] == probe[1].decode()
    assert not only(at_raw, h2.events.ConnectionTerminated)


def test_client_sees_a_refused_stream_as_refused() -> None:
    """Streams opened before the server's SETTINGS arrive may exceed its limit: the client is told which."""
    client, server = ClientConnection(), ServerConnection(Settings(max_concurrent_streams=3))
    streams = [open_stream(client) for _ in range(4)]
    at_client, at_server = pump(client, server)
    assert [r.stream_id for r in only(at_server, ConnectRequest)] == streams[:3]
    assert only(at_client, StreamReset) == [StreamReset(streams[3], ErrorCodes.REFUSED_STREAM, refused=True)]
    assert client.peer_stream_limit == 3
    server.accept(streams[0])
    pump(client, server)
    client.send(streams[0], b"still here")
    _, at_server = pump(client, server)
    assert received(at_server, streams[0])[0] == b"still here"


# -- connection errors


def test_oversized_header_block_ends_the_connection_with_goaway() -> None:
    raw, server, _ = raw_connected()
    raw.send_headers(1, connect_headers("10.0.0.1:80", (b"x-big", b"v" * (20 * KIB))))
    events = server.receive(raw.data_to_send())
    assert len(events) == 1 and isinstance(events[0], ConnectionEnded)
    assert events[0].error_code in (ErrorCodes.ENHANCE_YOUR_CALM, ErrorCodes.PROTOCOL_ERROR,
                                    ErrorCodes.COMPRESSION_ERROR)
    assert "header" in events[0].reason.lower() and "16384" in events[0].reason
    assert server.closed == events[0]
    [goaway] = only(list(raw.receive_data(server.data_to_send())), h2.events.ConnectionTerminated)
    assert goaway.error_code == events[0].error_code


def test_oversized_header_block_on_an_excess_stream_ends_the_connection() -> None:
    raw, server, _ = raw_connected(Settings(max_concurrent_streams=1), ignore_limit=True)
    raw.send_headers(1, connect_headers("10.0.0.1:80"))
    pump(raw, server)
    raw.send_headers(3, connect_headers("10.0.0.1:80", (b"x-big", b"v" * (20 * KIB))))
    events = server.receive(raw.data_to_send())
    assert [type(ev) for ev in events] == [ConnectionEnded]
    assert only(list(raw.receive_data(server.data_to_send())), h2.events.ConnectionTerminated)


@pytest.mark.parametrize("garbage", [
    b"GET / HTTP/1.1\r\nHost: 10.0.0.1\r\n\r\n",
    bytes.fromhex("160301020001") + os.urandom(64),  # a TLS ClientHello where the preface belongs
    b"\x00" * 64,
])
def test_garbage_instead_of_the_preface_ends_the_connection(garbage: bytes) -> None:
    server = ServerConnection()
    server.data_to_send()
    events = server.receive(garbage)
    assert len(events) == 1 and isinstance(events[0], ConnectionEnded)
    assert events[0].error_code == ErrorCodes.PROTOCOL_ERROR
    assert "preamble" in events[0].reason.lower()
    assert server.closed == events[0]


def test_h2_logging_runs_no_python_frame() -> None:
    """h2 logs a few times per stream (debug messages nobody reads): the logger it is given does that in C."""
    client, server = connected()
    logged: list[str] = []

    def profiler(frame: types.FrameType, event: str, _arg: object) -> None:
        if event == "call" and frame.f_code.co_name in ("debug", "trace") and "/h2/" in frame.f_code.co_filename:
            logged.append(frame.f_code.co_filename)

    sys.setprofile(profiler)
    try:
        stream_id = tunnel(client, server)
        client.end(stream_id)
        server.end(stream_id)
        pump(client, server)
    finally:
        sys.setprofile(None)
    assert stream_id and not logged
