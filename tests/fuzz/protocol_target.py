"""The protocol-layer fuzz target: one generated session fed to a ``ServerConnection`` (or, with hostile
server bytes, a ``ClientConnection``) while this code plays the I/O layer's part with choices drawn from
the same source (accept, answer, send, end, reset, acknowledge, block the output).

``run_one`` raises ``AssertionError`` when an invariant breaks; any other exception escaping it is a
finding too. Invariants, after every read:

* no method of the protocol object raises, in any state;
* ``ConnectionEnded`` comes once, last in its read, and nothing is reported after it;
* what the object gives to send is whole HTTP/2 frames, none larger than allowed;
* what it holds stays within ``Settings.receive_budget``;
* once ended (or released), every call is a no-op.
"""

from __future__ import annotations

from hbone.authority import Authority
from hbone.events import ConnectionEnded, ConnectRequest, ConnectResponse, Data, StreamEnded, StreamReset
from hbone.protocol import ClientConnection, Connection, ServerConnection, Settings
from tests.fuzz.h2gen import PREFACE, ClientScript, Source, reads

AUTHORITY = "10.0.0.1:8080"
SETTINGS = Settings()
_MAX_SENT_FRAME = 1 << 24


def check_frames(out: bytes) -> None:
    """``out`` is whole frames with lengths that add up."""
    pos = 0
    while pos < len(out):
        assert len(out) - pos >= 9, f"a partial frame header at {pos} of {len(out)}"
        length = int.from_bytes(out[pos:pos + 3], "big")
        assert length < _MAX_SENT_FRAME
        pos += 9 + length
    assert pos == len(out), f"frames overrun the output ({pos} > {len(out)})"


def _check_events(conn: Connection, events: list[object], was_closed: bool) -> None:
    if was_closed:
        assert events == [], f"events after the connection ended: {events[:3]}"
    ends = [i for i, ev in enumerate(events) if isinstance(ev, ConnectionEnded)]
    assert len(ends) <= 1 and (not ends or ends[0] == len(events) - 1), f"ConnectionEnded not last: {events[-3:]}"
    assert (conn.closed is not None) == (was_closed or bool(ends))


def _io_step(src: Source, conn: Connection, events: list[object], pending: list[int], accepted: list[int]) -> None:
    """What an I/O layer might do after a read, drawn from ``src``."""
    server = conn if isinstance(conn, ServerConnection) else None
    for ev in events:
        if isinstance(ev, ConnectRequest):
            pending.append(ev.stream_id)
        elif isinstance(ev, Data) and src.pick(0, 3):
            conn.ack(ev.stream_id, ev.flow_length)
        elif isinstance(ev, StreamEnded) and src.pick(0, 1):
            conn.end(ev.stream_id)
        elif isinstance(ev, ConnectResponse) and ev.status == 200:
            accepted.append(ev.stream_id)
        elif isinstance(ev, StreamReset) and ev.stream_id in accepted:
            accepted.remove(ev.stream_id)
    for _ in range(src.pick(0, 4)):
        choice = src.pick(0, 9)
        if server is not None and pending and choice < 3:
            stream_id = pending.pop(src.pick(0, len(pending) - 1))
            if choice < 2:
                server.accept(stream_id)
                accepted.append(stream_id)
            else:
                server.respond(stream_id, [400, 401, 503][src.pick(0, 2)])
        elif accepted and choice < 6:
            stream_id = accepted[src.pick(0, len(accepted) - 1)]
            taken = conn.send(stream_id, b"r" * src.pick(0, 70000))
            assert taken >= 0 and conn.window(stream_id) >= 0
        elif accepted and choice == 6:
            conn.end(accepted.pop(src.pick(0, len(accepted) - 1)))
        elif accepted and choice == 7:
            conn.reset(accepted.pop(src.pick(0, len(accepted) - 1)))
        elif choice == 8:
            conn.output_blocked(bool(src.pick(0, 1)))
        else:
            conn.ack(src.pick(0, 9), src.pick(0, 70000))
    check_frames(conn.data_to_send())
    assert conn.buffered <= conn.settings.receive_budget, f"holds {conn.buffered} > {conn.settings.receive_budget}"


def run_one(src: Source) -> int:
    """One session; returns the number of reads fed."""
    client_role = src.pick(0, 4) == 0  # one in five: the peer is a hostile server and we are its client
    conn: Connection
    pending: list[int] = []
    accepted: list[int] = []
    if client_role:
        client = conn = ClientConnection(SETTINGS)
        for _ in range(src.pick(0, 5)):
            client.open(Authority("10.0.0.1", 8080), {"x": "y"})
        first = client.data_to_send()
        assert first.startswith(PREFACE)
        check_frames(first[len(PREFACE):])
    else:
        conn = ServerConnection(SETTINGS)
    session = ClientScript(src, AUTHORITY, responses=client_role).session(steps=src.pick(1, 40))
    fed = 0
    for i, action in enumerate(session):
        data = action[len(PREFACE):] if client_role and i == 0 and action.startswith(PREFACE) else action
        for chunk in reads(src, data):  # (a server sends no preface magic)
            was_closed = conn.closed is not None
            events: list[object] = list(conn.receive(chunk))
            fed += 1
            _check_events(conn, events, was_closed)
            _io_step(src, conn, events, pending, accepted)
        if conn.closed is not None:
            break
    if conn.closed is not None:
        assert conn.receive(b"\x00" * 9) == [] and conn.send(1, b"x") == 0
    conn.release()
    assert conn.closed is not None and conn.data_to_send() == b"" and conn.open_streams == 0
    return fed
