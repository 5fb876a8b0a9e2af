"""The server reads a CONNECT's HEADERS itself (hbone.protocol's short path): every request, plain or hostile, is
answered as h2 alone answers it: the same connection error code for what h2 refuses, the same headers for what
it accepts (and then ztunnel's 400 for what HBONE does not take)."""

from __future__ import annotations

from collections.abc import Sequence

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.stream
import pytest

from hbone.authority import Authority
from hbone.events import ConnectionEnded, ConnectRequest, Event, RequestRejected, StreamEnded
from hbone.protocol import ServerConnection
from tests.fixtures.h2peer import Header, raw_client

A = b"10.0.0.1:80"
PLAIN = [(b":method", b"CONNECT"), (b":authority", A)]
ZTUNNEL = [*PLAIN, (b"forwarded", b'for="10.1.2.3:40000"'), (b"baggage", b"k8s.namespace.name=default"),
           (b"traceparent", b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-00")]

# (what, header block): requests h2 accepts and requests it refuses, in the shapes a peer could send them.
REQUESTS: list[tuple[str, list[Header]]] = [
    ("plain CONNECT", PLAIN),
    ("ztunnel's headers", ZTUNNEL),
    (":authority first", [(b":authority", A), (b":method", b"CONNECT")]),
    ("an empty value", [*PLAIN, (b"baggage", b"")]),
    ("GET", [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"), (b":authority", A)]),
    ("lowercase connect", [(b":method", b"connect"), (b":authority", A)]),
    ("CONNECT with :path", [*PLAIN, (b":path", b"/")]),
    ("CONNECT with :scheme", [(b":method", b"CONNECT"), (b":scheme", b"https"), (b":authority", A)]),
    ("two :authority", [*PLAIN, (b":authority", b"10.0.0.2:80")]),
    ("two :method", [(b":method", b"CONNECT"), (b":method", b"CONNECT"), (b":authority", A)]),
    ("no :authority", [(b":method", b"CONNECT")]),
    ("no :method", [(b":authority", A)]),
    ("host only", [(b":method", b"CONNECT"), (b"host", A)]),
    ("host as :authority", [*PLAIN, (b"host", A)]),
    ("host against :authority", [*PLAIN, (b"host", b"10.0.0.9:80")]),
    ("empty :authority", [(b":method", b"CONNECT"), (b":authority", b"")]),
    ("bad :authority", [(b":method", b"CONNECT"), (b":authority", b"10.0.0.1")]),
    ("space in :authority", [(b":method", b"CONNECT"), (b":authority", b"10.0.0.1 :80")]),
    (":authority with surrounding space", [(b":method", b"CONNECT"), (b":authority", b" 10.0.0.1:80")]),
    ("uppercase name", [*PLAIN, (b"Baggage", b"x")]),
    ("connection header", [*PLAIN, (b"connection", b"close")]),
    ("keep-alive", [*PLAIN, (b"keep-alive", b"5")]),
    ("transfer-encoding", [*PLAIN, (b"transfer-encoding", b"chunked")]),
    ("upgrade", [*PLAIN, (b"upgrade", b"h2c")]),
    ("te: gzip", [*PLAIN, (b"te", b"gzip")]),
    ("te: trailers", [*PLAIN, (b"te", b"trailers")]),
    ("cookies", [*PLAIN, (b"cookie", b"a=1"), (b"cookie", b"b=2")]),
    ("content-length", [*PLAIN, (b"content-length", b"0")]),
    ("pseudo-header after a header", [(b":method", b"CONNECT"), (b"baggage", b"x"), (b":authority", A)]),
    ("custom pseudo-header", [*PLAIN, (b":foo", b"x")]),
    (":status in a request", [*PLAIN, (b":status", b"200")]),
    ("extended CONNECT without :path", [*PLAIN, (b":protocol", b"websocket")]),
    ("extended CONNECT", [*PLAIN, (b":protocol", b"websocket"), (b":scheme", b"https"), (b":path", b"/")]),
    ("value with surrounding space", [*PLAIN, (b"baggage", b" x")]),
    ("value with a tab at the end", [*PLAIN, (b"baggage", b"x\t")]),
    ("value with CR LF", [*PLAIN, (b"baggage", b"a\r\nb")]),
    ("value with NUL", [*PLAIN, (b"baggage", b"a\0b")]),
    ("empty name", [*PLAIN, (b"", b"x")]),
    ("colon inside a name", [*PLAIN, (b"a:b", b"x")]),
    ("space in a name", [*PLAIN, (b"a b", b"x")]),
    ("DEL in a name", [*PLAIN, (b"a\x7fb", b"x")]),
    ("8-bit name", [*PLAIN, (b"caf\xe9", b"x")]),
    ("8-bit value", [*PLAIN, (b"baggage", b"caf\xe9")]),
]


def _request_bytes(headers: list[Header], end_stream: bool) -> bytes:
    client = raw_client()
    client.send_headers(1, headers, end_stream=end_stream)
    return client.data_to_send()


def _h2_answer(data: bytes) -> tuple[object, ...]:
    """What h2 alone makes of the request: ("refused", code) or ("accepted", headers, stream ended)."""
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    server.initiate_connection()
    try:
        events = server.receive_data(data)
    except h2.exceptions.ProtocolError as e:
        return ("refused", int(e.error_code))
    [request] = [ev for ev in events if isinstance(ev, h2.events.RequestReceived)]
    headers = {k.decode(): v.decode(errors="replace") for k, v in request.headers or []}
    return ("accepted", headers, request.stream_ended is not None)


def _our_answer(events: Sequence[Event]) -> tuple[object, ...]:
    ended = any(isinstance(ev, StreamEnded) for ev in events)
    for ev in events:
        if isinstance(ev, ConnectionEnded):
            return ("refused", ev.error_code)
        if isinstance(ev, ConnectRequest):
            return ("accepted", dict(ev.headers), ended)
        if isinstance(ev, RequestRejected):
            assert ev.status == 400
            return ("accepted", None, ended)  # h2 let it through; HBONE answered 400
    raise AssertionError(f"no answer to the request: {events}")


def _goaways(out: bytes) -> list[tuple[int, int]]:
    """(frame type, error code) of the GOAWAY frames in ``out``."""
    found, pos = [], 0
    while pos + 9 <= len(out):
        length, kind = int.from_bytes(out[pos:pos + 3], "big"), out[pos + 3]
        if kind == 7:
            found.append((kind, int.from_bytes(out[pos + 13:pos + 17], "big")))
        pos += 9 + length
    return found


@pytest.mark.parametrize("end_stream", [False, True], ids=["open", "END_STREAM"])
@pytest.mark.parametrize(("what", "headers"), REQUESTS, ids=[what for what, _ in REQUESTS])
def test_a_request_is_answered_as_h2_answers_it(what: str, headers: list[Header], end_stream: bool) -> None:
    data = _request_bytes(headers, end_stream)
    expected = _h2_answer(data)
    server = ServerConnection()
    server.data_to_send()
    ours = _our_answer(server.receive(data))
    if ours[0] == "accepted" and ours[1] is None:  # a 400: compare what h2 accepted, not the headers
        assert expected[0] == "accepted" and expected[2] == ours[2], what
    else:
        assert ours == expected, what
    if expected[0] == "refused":
        assert server.closed is not None and (7, expected[1]) in _goaways(server.data_to_send())
    else:  # and the connection serves the next request, HPACK still in step with the peer
        client = raw_client()
        client.send_headers(1, headers, end_stream=end_stream)
        client.send_headers(3, ZTUNNEL)
        server = ServerConnection()
        events = server.receive(client.data_to_send())
        assert [ev.stream_id for ev in events if isinstance(ev, ConnectRequest)][-1] == 3


def test_h2_validates_only_what_is_not_a_plain_connect(monkeypatch: pytest.MonkeyPatch) -> None:
    """The short path is the one taken by a plain CONNECT: h2's per-stream header handling is not called."""
    calls: list[int] = []
    original = h2.stream.H2Stream.receive_headers

    def counted(self: h2.stream.H2Stream, *args: object, **kwargs: object) -> object:
        calls.append(self.stream_id)
        return original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(h2.stream.H2Stream, "receive_headers", counted)
    client = raw_client()
    client.send_headers(1, ZTUNNEL)
    client.send_headers(3, [*PLAIN, (b"te", b"trailers")])
    client.send_headers(5, PLAIN, end_stream=True)
    events = ServerConnection().receive(client.data_to_send())
    assert [(ev.stream_id, ev.authority) for ev in events if isinstance(ev, ConnectRequest)] == [
        (1, Authority("10.0.0.1", 80)), (3, Authority("10.0.0.1", 80)), (5, Authority("10.0.0.1", 80))]
    assert [ev.stream_id for ev in events if isinstance(ev, StreamEnded)] == [5]
    assert calls == [3]
