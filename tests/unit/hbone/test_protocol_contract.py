"""hbone.protocol's contract in every state, and its limits, without sockets (issue 17, rows 1 and 4-7).

Frames are written byte by byte (tests.fixtures.rawh2.frame) where no HTTP/2 library would write them."""

from __future__ import annotations

import weakref

from h2.errors import ErrorCodes

from hbone.authority import Authority
from hbone.events import ConnectionEnded, Data, GoAwayReceived, StreamEnded, StreamReset
from hbone.protocol import KIB, ClientConnection, ServerConnection, Settings
from tests.fixtures.rawh2 import CONTINUATION, HEADERS, PING, frame, goaway, ping, rst_stream
from tests.unit.hbone.test_protocol import connected, only, pump, received, tunnel

WINDOW_UPDATE_ZERO = frame(0x8, 0, 0, (0).to_bytes(4, "big"))  # a connection error (PROTOCOL_ERROR)


def ended(server: ServerConnection) -> list[object]:
    """A server connection ended by the peer's protocol error; returns the events of that read."""
    events: list[object] = list(server.receive(WINDOW_UPDATE_ZERO))
    assert server.closed is not None and server.closed.error_code == ErrorCodes.PROTOCOL_ERROR
    return events


# -- 4: after CLOSED every call is a no-op


def test_every_call_after_the_connection_ended_is_a_no_op() -> None:
    client, server = connected()
    stream_id = tunnel(client, server)
    second = client.open(Authority("10.0.0.1", 81))
    assert second is not None
    client_bytes = client.data_to_send()
    ended(server)
    goaway_bytes = server.data_to_send()
    assert goaway_bytes  # the GOAWAY is there to be sent
    # nothing raises, nothing is produced
    assert server.receive(client_bytes) == []
    assert server.send(stream_id, b"late") == 0
    server.end(stream_id)
    server.reset(stream_id)
    server.ack(stream_id, 100)
    server.accept(second)
    server.respond(second, 503)
    server.goaway()
    server.output_blocked(True)
    assert server.window(stream_id) == 0
    assert server.open_streams == 0
    assert server.data_to_send() == b""
    server.release()
    assert server.receive(ping()) == []


def test_a_client_can_open_nothing_once_ended_or_going_away() -> None:
    client, server = connected()
    server.goaway()
    at_client, _ = pump(client, server)
    assert only(at_client, GoAwayReceived) == [GoAwayReceived(0, "GOAWAY received")]
    assert client.open(Authority("10.0.0.1", 80)) is None
    client.receive(WINDOW_UPDATE_ZERO)  # a server that breaks the rules
    assert client.closed is not None
    assert client.open(Authority("10.0.0.1", 80)) is None


def test_a_graceful_goaway_leaves_the_streams_it_allows_working() -> None:
    client, server = connected()
    stream_id = tunnel(client, server)
    events = server.receive(goaway(stream_id))  # the client says it is closing
    assert events == [GoAwayReceived(stream_id, "GOAWAY received")]
    assert server.closed is None
    assert server.send(stream_id, b"answer") == 6
    server.end(stream_id)
    at_client, _ = pump(client, server)
    assert received(at_client, stream_id)[0] == b"answer"
    assert StreamEnded(stream_id) in at_client


def test_a_request_after_the_peers_goaway_is_refused() -> None:
    client, server = connected()
    server.receive(goaway(0))
    client.open(Authority("10.0.0.1", 80))
    events = server.receive(client.data_to_send())
    assert events == []
    at_client = client.receive(server.data_to_send())
    assert [(r.stream_id, r.refused) for r in only(at_client, StreamReset)] == [(1, True)]


# -- 5: events of the frames before an error in the same read


def test_events_before_an_error_in_the_same_read_are_delivered() -> None:
    client, server = connected()
    stream_id = tunnel(client, server)
    third = client.open(Authority("10.0.0.1", 80))  # a new stream makes h2 drop closed ones from its table
    events = server.receive(rst_stream(stream_id) + client.data_to_send() + WINDOW_UPDATE_ZERO)
    assert StreamReset(stream_id, ErrorCodes.CANCEL, False) in events
    assert [type(ev) for ev in events][-1] is ConnectionEnded
    assert third is not None
    assert server.send(stream_id, b"to a reset stream") == 0  # was: KeyError


# -- 6: a stream ended by trailers keeps nothing


def test_a_stream_ended_by_trailers_leaves_no_state() -> None:
    client, server = connected()
    for _ in range(50):
        stream_id = tunnel(client, server)
        client.send(stream_id, b"x" * 1000)
        _, at_server = pump(client, server)
        for d in only(at_server, Data):  # passed on, acknowledged
            server.ack(d.stream_id, d.flow_length)
        client._h2.send_headers(stream_id, [(b"x-trailer", b"1")], end_stream=True)  # trailers end it
        _, at_server = pump(client, server)
        assert StreamEnded(stream_id) in at_server
        server.end(stream_id)  # the upstream's FIN in turn: the stream is closed both ways
        pump(client, server)
    assert server._unacked == {} and server._recv_windows == {}  # was: one entry per stream, for ever


# -- 7: control-frame replies are bounded while the peer does not read


def test_ping_replies_are_bounded_while_the_output_is_blocked() -> None:
    server = ServerConnection(Settings(max_queued_control=100))
    client = ClientConnection()
    pump(client, server)
    server.output_blocked(True)
    events = server.receive(ping() * 100)
    assert events == [] and server.closed is None
    events = server.receive(ping())
    assert [(ev.error_code, "PING/SETTINGS" in ev.reason) for ev in only(events, ConnectionEnded)] == [
        (ErrorCodes.ENHANCE_YOUR_CALM, True)]


def test_ping_replies_count_again_from_zero_once_the_peer_reads() -> None:
    server = ServerConnection(Settings(max_queued_control=100))
    client = ClientConnection()
    pump(client, server)
    for _ in range(5):
        server.output_blocked(True)
        server.receive(ping() * 100)
        server.output_blocked(False)
    assert server.closed is None
    assert server.data_to_send().count(bytes([0, 0, 8, PING, 1])) == 500  # every PING answered


# -- 1: header blocks and memory


def test_a_header_block_is_refused_once_over_its_bound_without_waiting_for_its_end() -> None:
    server = ServerConnection()
    pump(ClientConnection(), server)
    fragment = b"\x00" * (16 * KIB)
    events = server.receive(frame(HEADERS, 0, 1, fragment) + frame(CONTINUATION, 0, 1, fragment))
    assert events == [] and server.buffered <= 32 * KIB + 9
    events = server.receive(frame(CONTINUATION, 0, 1, b"\x00"))
    assert [ev.error_code for ev in only(events, ConnectionEnded)] == [ErrorCodes.ENHANCE_YOUR_CALM]
    assert server.buffered < 9 + 8 + 256  # only the GOAWAY (with its reason) waits to be sent


def test_what_one_connection_holds_stays_within_its_budget() -> None:
    settings = Settings()
    server = ServerConnection(settings)
    pump(ClientConnection(), server)
    server.receive(frame(HEADERS, 0, 1, b"\x00" * (16 * KIB)))
    server.receive(frame(CONTINUATION, 0, 1, b"\x00" * (16 * KIB)))
    server.receive(frame(0x0, 0, 3, b"y" * (512 * KIB))[:-1])  # most of a DATA frame
    assert server.buffered <= settings.receive_budget


def test_a_connection_ended_by_an_error_is_freed_without_the_collector(no_collector: None) -> None:
    server = ServerConnection()
    pump(ClientConnection(), server)
    server.receive(frame(HEADERS, 0, 1, b"\x00" * (16 * KIB)))
    h2_ref = weakref.ref(server._h2)
    ended(server)
    del server
    assert h2_ref() is None  # was: kept by h2's own reference cycle until a full collection


def test_a_released_connection_is_freed_without_the_collector(no_collector: None) -> None:
    client, server = connected()
    tunnel(client, server)
    refs = [weakref.ref(client._h2), weakref.ref(server._h2)]
    client.release()
    server.release()
    del client, server
    assert [r() for r in refs] == [None, None]


# -- found by the fuzzer


def test_a_window_made_negative_by_the_peers_settings_sends_nothing_until_reopened() -> None:
    """The peer lowers SETTINGS_INITIAL_WINDOW_SIZE below what was already sent (RFC 9113 §6.9.2)."""
    client, server = connected()
    stream_id = tunnel(client, server)
    assert server.send(stream_id, b"s" * 60000) == 60000
    pump(client, server)
    lower = (0x4).to_bytes(2, "big") + (1000).to_bytes(4, "big")  # INITIAL_WINDOW_SIZE = 1000
    server.receive(frame(0x4, 0, 0, lower))
    assert server._h2.local_flow_control_window(stream_id) < 0
    assert server.window(stream_id) == 0  # was: negative
    assert server.send(stream_id, b"more") == 0
    server.receive(frame(0x8, 0, stream_id, (70000).to_bytes(4, "big")))
    assert server.window(stream_id) > 0 and server.send(stream_id, b"more") == 4
