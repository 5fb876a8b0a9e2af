"""HBONE's HTTP/2 CONNECT protocol, free of I/O (in the manner of h2 and h11).

A ``ServerConnection`` or ``ClientConnection`` is fed the bytes read from the TLS session with
``receive`` and returns events (``hbone.events``); ``data_to_send`` returns the bytes to write.
Everything about HTTP/2 CONNECT that does not need a socket lives here: request validation and the
answers ztunnel gives (400 bad method or authority), flow-control windows sized for throughput, the
stream limit treated as a stream error (RFC 9113 §5.1.2), END_STREAM as TCP FIN and
RST_STREAM(CONNECT_ERROR) as TCP RST, and the limits that keep a hostile peer's cost bounded (see
``Settings``).

The contract holds in every state: no method raises because of what the peer sent or the state the
connection is in. Once the connection has ended (``closed`` is set) every call is a no-op: ``receive``
returns no events, ``send`` takes nothing, ``open`` returns None.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import h2.utilities
import hpack
from h2.connection import AllowedStreamIDs, ConnectionInputs, ConnectionState
from h2.errors import ErrorCodes
from h2.frame_buffer import FrameBuffer
from h2.stream import StreamInputs, StreamState
from hpack.struct import Header
from hyperframe.frame import DataFrame, Frame, GoAwayFrame, HeadersFrame, RstStreamFrame

from hbone import header_block
from hbone.authority import Authority
from hbone.events import (
    ConnectionEnded,
    ConnectRequest,
    ConnectResponse,
    Data,
    Event,
    GoAwayReceived,
    RequestRejected,
    StreamEnded,
    StreamReset,
    WindowOpened,
)

KIB = 1024
MIB = 1024 * KIB
_FRAME_HEADER = 9
_CONTROL_REPLY = _FRAME_HEADER + 8  # a PING ACK, the larger of the two replies a peer can ask for


@dataclass(frozen=True, slots=True)
class Settings:
    """HTTP/2 parameters and the limits on what one peer may make this side hold or do.

    Windows and the DATA frame size are ztunnel's (4 MiB stream, 16 MiB connection windows, 1 MiB
    frames): large DATA frames are what makes the tunnel fast. Every other frame is small by nature and
    is held to ``max_header_block``. The limits follow what the hardened servers do (nghttp2, Go's
    net/http2, Envoy): see each field.
    """

    stream_window: int = 4 * MIB
    connection_window: int = 16 * MIB
    max_frame_size: int = 1 * MIB  # DATA frames; what SETTINGS_MAX_FRAME_SIZE advertises
    max_concurrent_streams: int = 200  # what a server allows
    max_header_list_size: int = 16 * KIB  # decoded, as RFC 7541 counts it
    # A header block (HEADERS + CONTINUATIONs) is checked as its frames arrive, never assembled beyond
    # this many encoded bytes or this many CONTINUATION frames (nghttp2 and Node allow 8): a block larger
    # than twice the decoded limit cannot decode under it. Frames other than DATA are held to the same
    # byte bound, checked on their 9-byte header before their payload is read.
    max_header_block: int = 32 * KIB
    max_continuations: int = 8
    # Rapid reset (CVE-2023-44487): streams the peer resets before they were answered, plus streams
    # refused past the concurrency limit, are counted; past this budget, and once they are over half of
    # the streams the peer opened, the connection ends with ENHANCE_YOUR_CALM (Envoy's rule: 50 % of at
    # least 500 streams; lower here, a stream costs more in Python).
    reset_budget: int = 100
    # PING and SETTINGS each oblige a reply; while the peer does not read (the transport is paused),
    # at most this many are queued, then ENHANCE_YOUR_CALM (Go's maxQueuedControlFrames).
    max_queued_control: int = 10_000

    @property
    def receive_budget(self) -> int:
        """The most this layer itself holds for one connection: one partial DATA frame, one header block
        with one frame beyond it, and the queued control replies. Received DATA is held by no one beyond
        the connection window (the I/O layer acknowledges it only once passed on)."""
        return (_FRAME_HEADER + self.max_frame_size + 2 * (_FRAME_HEADER + self.max_header_block)
                + self.max_queued_control * _CONTROL_REPLY)


class ProtocolError(Exception):
    """The peer broke HTTP/2 or HBONE rules badly enough to end the whole connection."""

    def __init__(self, message: str, code: ErrorCodes = ErrorCodes.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.code = code


class _QuietDataFrame(DataFrame):
    """A received DATA frame whose repr leaves its payload out.

    h2 evaluates ``repr(frame)`` for every frame it receives, for a trace log line, whatever the log
    level, and hyperframe's repr of a DATA frame re-serializes and hex-encodes the whole payload (2 MiB
    of text for a 1 MiB frame) to keep 20 characters. Most DATA takes this layer's short path and never
    reaches h2, but what does (early or stray DATA) should not cost that. Only frames parsed by this
    connection's own frame buffer are of this class: no other user of hyperframe is affected.
    """

    def _body_repr(self) -> str:
        return f"<{len(self.data)} bytes>"


class _FrameBuffer(FrameBuffer):
    def __next__(self) -> Frame:
        frame = super().__next__()
        if frame.__class__ is DataFrame:
            frame.__class__ = _QuietDataFrame
        return frame


class _SilentLogger(h2.config.DummyLogger):
    """h2's no-op logger with built-in methods that take any arguments and do nothing (``"".format``): h2 logs a few
    times per stream, and each call to ``DummyLogger``'s own methods is a Python frame."""

    debug = trace = staticmethod("".format)  # type: ignore[assignment]


_SILENT = _SilentLogger()


class _Encoder(hpack.Encoder):
    """HPACK without Huffman coding. The values of a CONNECT's headers are short and mostly new on every
    stream (traceparent, forwarded's port): Huffman would save a few bytes of each at ~15 us of pure Python to
    encode and more for the peer to decode. (Huffman-coded headers from a peer are decoded as ever.)"""

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        return super().encode(headers, huffman=False)


# Request headers whose value is new on every stream: sent never-indexed, so that neither side's HPACK table
# takes them in (and evicts the :authority it could reuse) on every stream.
_UNIQUE_PER_STREAM = frozenset({b"traceparent", b"forwarded"})
# What h2's outbound validation would check of the extra request headers (it is off: it cost more than the
# rest of opening a stream): lower-case token names, not connection-specific, values without CR, LF or NUL.
_HEADER_NAME = re.compile(rb"[a-z0-9!#$%&'*+.^_`|~-]+\Z")
_CONNECTION_SPECIFIC = frozenset({b"connection", b"proxy-connection", b"keep-alive", b"transfer-encoding",
                                  b"upgrade", b"te", b"host"})
_BAD_VALUE = re.compile(rb"[\r\n\x00]|^[ \t]|[ \t]\Z")
# Names that passed the check, encoded: a proxy sends the same few on every stream (forwarded, traceparent).
_NAMES_CHECKED: dict[str, bytes] = {}
_NAMES_CHECKED_MAX = 64


def _request_header(name: str, value: str) -> tuple[bytes, bytes]:
    """One extra CONNECT request header, encoded and checked; ValueError names what is wrong."""
    k = _NAMES_CHECKED.get(name)
    if k is None:
        k = name.encode()
        if not _HEADER_NAME.match(k) or k in _CONNECTION_SPECIFIC:
            raise ValueError(f"request header name {name!r} is not a lower-case token allowed in HTTP/2")
        if len(_NAMES_CHECKED) < _NAMES_CHECKED_MAX:
            _NAMES_CHECKED[name] = k
    v = value.encode()
    if _BAD_VALUE.search(v):
        raise ValueError(f"request header {name!r}: value {value!r} has CR, LF, NUL or surrounding whitespace")
    return hpack.NeverIndexedHeaderTuple(k, v) if k in _UNIQUE_PER_STREAM else (k, v)


class _H2(h2.connection.H2Connection):
    """h2 with the concurrent-stream limit enforced per stream, as RFC 9113 §5.1.2 requires.

    h2 raises TooManyStreamsError, a connection error that would take every other stream down with the
    offending one. Here the excess stream alone is refused (and counted in ``refused``), after its header
    block has been decoded so that the HPACK state stays in step with the peer. A graceful GOAWAY from
    the peer leaves the connection open for the streams it allows (h2 would close it at once). Received
    DATA frames are parsed as ``_QuietDataFrame``s by this connection's own frame buffer.
    """

    MAX_CLOSED_STREAMS = 1024  # h2 remembers 65536 closed streams per connection; 5 x our stream limit do

    def __init__(self, config: h2.config.H2Configuration) -> None:
        super().__init__(config=config)
        self.incoming_buffer = _FrameBuffer(server=not config.client_side)
        self._frame_dispatch_table[_QuietDataFrame] = self._receive_data_frame
        self.refused = 0

    def _receive_headers_frame(self, frame: HeadersFrame) -> tuple[list[Frame], list[h2.events.Event]]:
        try:
            return super()._receive_headers_frame(frame)
        except h2.exceptions.TooManyStreamsError:
            try:
                self.decoder.decode(frame.data, raw=True)
            except hpack.OversizedHeaderListError as e:
                raise h2.exceptions.DenialOfServiceError(f"oversized header block: {e}") from e
            except hpack.HPACKError as e:
                raise h2.exceptions.ProtocolError(f"undecodable header block: {e}") from e
            self.highest_inbound_stream_id = max(self.highest_inbound_stream_id, frame.stream_id)
            self.refused += 1
            rst = RstStreamFrame(frame.stream_id)
            rst.error_code = ErrorCodes.REFUSED_STREAM
            return [rst], []

    def _receive_goaway_frame(self, frame: GoAwayFrame) -> tuple[list[Frame], list[h2.events.Event]]:
        state = self.state_machine.state
        frames, events = super()._receive_goaway_frame(frame)
        if frame.error_code == ErrorCodes.NO_ERROR:
            self.state_machine.state = state
        return frames, events

    def release(self) -> None:
        """Drop what h2 holds and break its reference cycle (the frame dispatch table holds bound methods
        of this object), so that the memory goes when the last reference does, not at the next full
        collection."""
        self._frame_dispatch_table.clear()
        self.incoming_buffer = FrameBuffer()
        self.streams.clear()
        self._closed_streams.clear()
        self.clear_outbound_data_buffer()


_DATA, _HEADERS, _SETTINGS, _PUSH_PROMISE, _PING, _GOAWAY, _CONTINUATION = 0x0, 0x1, 0x4, 0x5, 0x6, 0x7, 0x9
_ACK = _END_STREAM = 0x1
_END_HEADERS, _PADDED = 0x4, 0x8
_PREFACE_LENGTH = 24
_WINDOW_UPDATE_HEADER = b"\x00\x00\x04\x08\x00"
_END_STREAM_HEADER = b"\x00\x00\x00\x00\x01"  # an empty DATA frame with END_STREAM; the stream id follows
_STATUS_200_HEADER = b"\x00\x00\x01\x01\x04"  # HEADERS, END_HEADERS, 1 byte; the stream id, then _STATUS_200
_STATUS_200 = 0x88  # HPACK: static table entry 8, ":status: 200"
_OPEN_STATES = (ConnectionState.CLIENT_OPEN, ConnectionState.SERVER_OPEN)
_PING_ACK_HEADER = b"\x00\x00\x08\x06\x01\x00\x00\x00\x00"
_FRAME_NAMES = {0x0: "DATA", 0x1: "HEADERS", 0x2: "PRIORITY", 0x3: "RST_STREAM", 0x4: "SETTINGS", 0x5: "PUSH_PROMISE",
                0x6: "PING", 0x7: "GOAWAY", 0x8: "WINDOW_UPDATE", 0x9: "CONTINUATION"}


_PRUNE_AT_LEAST = 16  # see Connection._prune_due


def _window_update(stream_id: int, increment: int) -> bytes:
    return _WINDOW_UPDATE_HEADER + stream_id.to_bytes(4, "big") + increment.to_bytes(4, "big")


class Connection:
    """What client and server share: data, half-close, resets, flow control, limits.

    h2 owns the connection's state: HPACK, SETTINGS, stream states, RST_STREAM, GOAWAY, PING. DATA on an
    established stream takes a shorter path that h2's per-frame objects and copies made the bottleneck
    of the tunnel (about 22 us of Python per 1 KB message, four copies of every payload sent): frames
    are written and parsed here, received payloads are passed on as views of the bytes read, and this
    layer keeps the inbound windows and sends the WINDOW_UPDATEs. Two rules keep h2's view true: every
    byte sent is taken off h2's outbound windows as its own ``send_data`` would, and a DATA frame with
    END_STREAM reaches h2 as an empty END_STREAM frame, so that h2 still tracks every stream's state.

    Every other frame reaches h2 on its own, so that when h2 rejects one, the events of the frames
    before it are still delivered. Frame sizes and header blocks are checked here first.
    """

    def __init__(self, client_side: bool, settings: Settings) -> None:
        self.settings = settings
        # What this side sends is built here (CONNECT, :status): h2's outbound checks and normalization are off
        # (``_request_header`` checks the caller's headers); what the peer sends is validated.
        config = h2.config.H2Configuration(client_side=client_side, header_encoding=None,
                                           validate_inbound_headers=True, validate_outbound_headers=False,
                                           normalize_outbound_headers=False, logger=_SILENT)
        self._h2 = _H2(config=config)
        self._h2.encoder = _Encoder()
        codes = h2.settings.SettingCodes
        local = {
            codes.INITIAL_WINDOW_SIZE: settings.stream_window,
            codes.MAX_FRAME_SIZE: settings.max_frame_size,
            codes.MAX_CONCURRENT_STREAMS: settings.max_concurrent_streams,
            codes.MAX_HEADER_LIST_SIZE: settings.max_header_list_size,
        }
        if client_side:
            local[codes.ENABLE_PUSH] = 0
        self._h2.local_settings = h2.settings.Settings(client=client_side, initial_values=local)
        self._h2.decoder.max_header_list_size = settings.max_header_list_size
        self._h2.max_inbound_frame_size = settings.max_frame_size
        self._h2.initiate_connection()
        extra = settings.connection_window - 65535
        if extra > 0:
            self._h2.increment_flow_control_window(extra)
        self.closed: ConnectionEnded | None = None
        self.going_away: int | None = None  # the last stream id of the peer's graceful GOAWAY
        self._out: list[bytes | memoryview] = []
        self._partial = b""  # received bytes short of a whole frame
        self._preface = 0 if client_side else _PREFACE_LENGTH  # client preface bytes still owed to h2
        self._settings_seen = False  # the peer's first SETTINGS (the end of its preface)
        self._block = -1  # encoded bytes of the header block being received (-1: none)
        self._block_frames = 0  # CONTINUATION frames in it
        self._output_blocked = False
        self._queued_control = 0  # PING/SETTINGS replies owed while the output is blocked
        self._recv_conn_window = settings.connection_window
        self._unacked_conn = 0
        self._recv_windows: dict[int, int] = {}  # streams whose DATA this layer takes -> window left
        self._unacked: dict[int, int] = {}
        self._sendable: set[int] = set()  # streams this layer may send DATA on
        self._prune_at = _PRUNE_AT_LEAST  # h2's stream table size at which it is pruned again (``_prune_due``)

    # -- output
    def _emit(self, chunk: bytes | memoryview) -> None:
        """Queue ``chunk`` after whatever h2 has already queued, keeping frames in order."""
        if self._h2._data_to_send:  # (asked only when it has something: its answer costs a copy and a new buffer)
            self._out.append(self._h2.data_to_send())
        self._out.append(chunk)

    @property
    def output_pending(self) -> bool:
        """Whether ``data_to_send`` has something (cheaper than asking it)."""
        return bool(self._out) or bool(self._h2._data_to_send)

    def data_to_send(self) -> bytes:
        pending = self._h2.data_to_send() if self.closed is None and self._h2._data_to_send else b""
        if not self._out:
            return pending
        if pending:
            self._out.append(pending)
        out = b"".join(self._out)
        self._out.clear()
        return out

    def send(self, stream_id: int, data: bytes | memoryview) -> int:
        """Send as much of ``data`` as the flow-control windows allow; returns how much was taken (0 also
        when the stream can take no more: ended, reset, or its connection ended)."""
        if stream_id not in self._sendable:
            return 0
        h = self._h2
        stream = h.streams.get(stream_id)
        if stream is None:
            self._sendable.discard(stream_id)
            return 0
        room = min(len(data), h.outbound_flow_control_window, stream.outbound_flow_control_window)
        if room <= 0:
            return 0
        h.outbound_flow_control_window -= room
        stream.outbound_flow_control_window -= room
        frame, tail = h.max_outbound_frame_size, b"\x00\x00" + stream_id.to_bytes(4, "big")
        if room == len(data) and room <= frame:
            self._emit(room.to_bytes(3, "big") + tail)
            self._out.append(data)
            return room
        view = memoryview(data)
        for at in range(0, room, frame):
            chunk = view[at:min(at + frame, room)]
            self._emit(len(chunk).to_bytes(3, "big") + tail)
            self._out.append(chunk)
        return room

    def window(self, stream_id: int) -> int:
        """What ``stream_id`` may send now (0 for a stream that cannot send). Never negative, although the
        window itself may be: a peer that lowers SETTINGS_INITIAL_WINDOW_SIZE after data was sent puts it
        below zero (RFC 9113 §6.9.2) until WINDOW_UPDATEs bring it back."""
        if stream_id not in self._sendable:
            return 0
        return max(0, self._h2.local_flow_control_window(stream_id))

    def end(self, stream_id: int) -> None:
        """Half-close: END_STREAM, the HTTP/2 form of TCP FIN (a no-op on a stream that cannot send). The frame
        is written here, h2 taking the state transitions its own ``end_stream`` would (a third of its cost)."""
        if stream_id not in self._sendable:
            return
        self._sendable.discard(stream_id)
        h = self._h2
        stream = h.streams.get(stream_id)
        if stream is None:
            return
        try:
            self._connection_input(ConnectionInputs.SEND_DATA)
            stream.state_machine.process_input(StreamInputs.SEND_END_STREAM)
        except h2.exceptions.ProtocolError:  # closed on h2's side (reset meanwhile): nothing to end
            return
        self._emit(_END_STREAM_HEADER + stream_id.to_bytes(4, "big"))

    def reset(self, stream_id: int, code: ErrorCodes = ErrorCodes.CONNECT_ERROR) -> None:
        """RST_STREAM; CONNECT_ERROR (the default) is how HTTP/2 carries a TCP reset. A no-op on a stream
        that is closed already."""
        if self.closed is not None:
            return
        self._forget(stream_id)
        self._h2_call(self._h2.reset_stream, stream_id, code)

    def ack(self, stream_id: int, flow_length: int) -> None:
        """Data received on ``stream_id`` was passed on: let the peer send that much more."""
        if self.closed is not None:
            return
        self._unacked_conn += flow_length
        if self._unacked_conn >= self.settings.connection_window // 4:
            self._recv_conn_window += self._unacked_conn
            self._emit(_window_update(0, self._unacked_conn))
            self._unacked_conn = 0
        if stream_id in self._recv_windows:
            unacked = self._unacked.get(stream_id, 0) + flow_length
            if unacked >= self.settings.stream_window // 4:
                self._recv_windows[stream_id] += unacked
                self._emit(_window_update(stream_id, unacked))
                unacked = 0
            self._unacked[stream_id] = unacked

    def goaway(self, code: ErrorCodes = ErrorCodes.NO_ERROR) -> None:
        """GOAWAY: the connection ends (after ``data_to_send`` has given the frame)."""
        if self.closed is None:
            self._h2_call(self._h2.close_connection, code)
            self._close(ConnectionEnded(int(code), "closed by this side"))

    def output_blocked(self, blocked: bool) -> None:
        """The I/O layer's word on the output: ``blocked`` while the peer does not take what is sent."""
        self._output_blocked = blocked
        if not blocked:
            self._queued_control = 0

    def release(self) -> None:
        """The transport is gone: end the connection if it has not ended and let go of all it holds."""
        if self.closed is None:
            self._close(ConnectionEnded(0, "connection released"))
        self._out.clear()

    @property
    def open_streams(self) -> int:
        if self.closed is not None:
            return 0
        return self._h2.open_outbound_streams + self._h2.open_inbound_streams

    @property
    def awaiting_headers(self) -> bool:
        """The peer owes the rest of its preface, of a header block or of a frame other than DATA: what a
        header-read timeout applies to."""
        if self.closed is not None:
            return False
        if self._preface or not self._settings_seen or self._block >= 0:
            return True
        partial = self._partial
        return 0 < len(partial) < _FRAME_HEADER or (len(partial) >= _FRAME_HEADER and partial[3] != _DATA)

    @property
    def buffered(self) -> int:
        """Bytes this layer holds: the partial frame, h2's header block, the output not yet taken."""
        return len(self._partial) + max(self._block, 0) + sum(len(c) for c in self._out)

    def _established(self, stream_id: int, receiving: bool) -> None:
        """A stream whose DATA now takes the short path (both ways, or only outbound)."""
        self._sendable.add(stream_id)
        if receiving:
            self._recv_windows[stream_id] = self.settings.stream_window

    def _prune_due(self) -> bool:
        """h2 keeps a closed stream in its table until it next counts open streams, which walks the whole table (and
        prunes it). Counted on every stream, that is a walk of every other stream of the tunnel; never counted, the
        closed streams pile up (to the concurrency limit on a server: thousands of objects for the collector to
        traverse). Due once the table has doubled since the last count: it then holds about as many closed streams
        as open ones, at a cost per stream that does not grow with the tunnel's streams."""
        return len(self._h2.streams) >= self._prune_at

    def _counted(self, outbound: bool) -> int:
        """The open streams one way, counted by h2 (which prunes its table of closed streams as it counts)."""
        h = self._h2
        count = h.open_outbound_streams if outbound else h.open_inbound_streams
        self._prune_at = max(2 * len(h.streams), _PRUNE_AT_LEAST)
        return int(count)

    def _connection_input(self, input_: ConnectionInputs) -> None:
        """h2's connection state machine takes ``input_`` (HEADERS or DATA sent or received): nothing to do in an
        open state, where those leave the state as it is (and the lookup hashes two Python-level enums)."""
        machine = self._h2.state_machine
        if machine.state not in _OPEN_STATES:
            machine.process_input(input_)

    def _forget(self, stream_id: int) -> None:
        self._sendable.discard(stream_id)
        self._recv_windows.pop(stream_id, None)
        self._unacked.pop(stream_id, None)

    def _h2_call(self, method: Callable[..., object], *args: object, **kwargs: object) -> bool:
        """Call into h2 for something this side sends; h2 refusing it (the stream or the connection is
        closed on h2's side) makes it a no-op. Returns whether h2 took it."""
        try:
            method(*args, **kwargs)
        except h2.exceptions.ProtocolError:
            return False
        return True

    def _close(self, ended: ConnectionEnded, out: list[Event] | None = None) -> None:
        """The connection has ended: keep what h2 queued (the GOAWAY), then let go of everything else."""
        self.closed = ended
        if out is not None:
            out.append(ended)
        pending = self._h2.data_to_send()
        if pending:
            self._out.append(pending)
        self._partial = b""
        self._block = -1
        self._sendable.clear()
        self._recv_windows.clear()
        self._unacked.clear()
        self._h2.release()

    # -- input
    def receive(self, data: bytes | memoryview) -> list[Event]:
        out: list[Event] = []
        if self.closed is not None:
            return out
        try:
            self._receive(data, out)
        except ProtocolError as e:
            self._fail(e.code, str(e), out)
        return out

    def _receive(self, data: bytes | memoryview, out: list[Event]) -> None:
        if self._preface:
            head, data = data[:self._preface], data[self._preface:]
            self._preface -= len(head)
            self._to_h2(head, out)
        buf = self._partial + data if self._partial else data
        size, pos = len(buf), 0
        view = memoryview(buf)
        max_data, max_other = self.settings.max_frame_size, self.settings.max_header_block
        while size - pos >= _FRAME_HEADER and self.closed is None:
            length = int.from_bytes(view[pos:pos + 3], "big")
            kind, flags = buf[pos + 3], buf[pos + 4]
            if length > (max_data if kind == _DATA else max_other):
                raise ProtocolError(f"{_FRAME_NAMES.get(kind, f'type {kind}')} frame of {length} bytes exceeds"
                                    f" {max_data if kind == _DATA else max_other}", ErrorCodes.FRAME_SIZE_ERROR)
            end = pos + _FRAME_HEADER + length
            if end > size:
                break
            stream_id = int.from_bytes(view[pos + 5:pos + 9], "big") & 0x7FFFFFFF
            if kind == _DATA and self._block < 0:
                if stream_id in self._recv_windows:
                    self._take_data(stream_id, flags, view[pos + 9:end], length, out)
                else:
                    self._to_h2(view[pos:end], out)
            elif kind == _PING:
                self._ping(stream_id, flags, view[pos + 9:end])
            elif kind == _HEADERS and self._block < 0 and (
                    (flags == _END_HEADERS and length == 1 and buf[pos + 9] == _STATUS_200
                     and self._ok_received(stream_id, out))
                    or (flags & ~_END_STREAM == _END_HEADERS
                        and self._request_received(stream_id, flags, view[pos + 9:end], out))):
                pass
            else:
                self._control_frame(kind, flags, length)
                self._to_h2(view[pos:end], out)
            pos = end
        self._partial = bytes(view[pos:]) if pos < size and self.closed is None else b""

    def _ping(self, stream_id: int, flags: int, payload: memoryview) -> None:
        """PING is answered here (h2 would too, at ten times the cost of a frame a peer may send at will)."""
        if stream_id:
            raise ProtocolError(f"PING on stream {stream_id}")
        if len(payload) != 8:
            raise ProtocolError(f"PING of {len(payload)} bytes", ErrorCodes.FRAME_SIZE_ERROR)
        if flags & _ACK:
            return  # this side sends no PING: an answer to nothing
        self._count_control_reply()
        self._emit(_PING_ACK_HEADER + bytes(payload))

    def _count_control_reply(self) -> None:
        if self._output_blocked:
            self._queued_control += 1
            if self._queued_control > self.settings.max_queued_control:
                raise ProtocolError(f"{self._queued_control} PING/SETTINGS frames while not reading the replies",
                                    ErrorCodes.ENHANCE_YOUR_CALM)

    def _control_frame(self, kind: int, flags: int, length: int) -> None:
        """Checks and bookkeeping for a frame other than DATA, before h2 sees it."""
        settings = self.settings
        if kind == _CONTINUATION and self._block >= 0:
            self._block += length
            self._block_frames += 1
            if self._block > settings.max_header_block or self._block_frames > settings.max_continuations:
                raise ProtocolError(f"header block over {self._block_frames} CONTINUATION frames and {self._block}"
                                    f" bytes exceeds {settings.max_continuations} frames or"
                                    f" {settings.max_header_block} bytes", ErrorCodes.ENHANCE_YOUR_CALM)
            if flags & _END_HEADERS:
                self._block = -1
        elif kind in (_HEADERS, _PUSH_PROMISE) and self._block < 0 and not flags & _END_HEADERS:
            self._block, self._block_frames = length, 0
        elif kind == _SETTINGS and not flags & _ACK:
            self._settings_seen = True
            self._count_control_reply()
        elif kind == _GOAWAY:
            pending = self._h2.data_to_send()  # h2 drops its unsent output on GOAWAY: keep it
            if pending:
                self._out.append(pending)

    def _take_data(self, stream_id: int, flags: int, payload: memoryview, length: int, out: list[Event]) -> None:
        window = self._recv_windows[stream_id]
        if length > window or length > self._recv_conn_window:
            raise ProtocolError(f"stream {stream_id} sent {length} bytes beyond its flow-control window",
                                ErrorCodes.FLOW_CONTROL_ERROR)
        self._recv_windows[stream_id] = window - length
        self._recv_conn_window -= length
        if flags & _PADDED:
            pad = payload[0] if length else 256
            if pad >= length:
                raise ProtocolError(f"stream {stream_id} sent a DATA frame whose padding exceeds it")
            payload = payload[1:length - pad]
        if payload:
            out.append(Data(stream_id, payload, length))
        elif length:
            self.ack(stream_id, length)  # padding only: nothing to pass on, give the window back
        if flags & _END_STREAM:
            self._recv_windows.pop(stream_id, None)
            self._unacked.pop(stream_id, None)
            if not self._end_received(stream_id, out):
                self._to_h2(_END_STREAM_HEADER + stream_id.to_bytes(4, "big"), out)

    def _end_received(self, stream_id: int, out: list[Event]) -> bool:
        """END_STREAM on a stream open for receiving: h2 takes the state transitions its handling of the frame
        would (a DATA frame, then its END_STREAM) without the frame, and StreamEnded is reported. False (h2 to
        handle the frame) in any other state."""
        h = self._h2
        stream = h.streams.get(stream_id)
        if (stream is None or h.state_machine.state not in _OPEN_STATES
                or stream.state_machine.state not in (StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL)):
            return False
        # (RECV_DATA leaves an open connection's state as it is: only the stream's takes it.)
        stream.state_machine.process_input(StreamInputs.RECV_DATA)
        stream.state_machine.process_input(StreamInputs.RECV_END_STREAM)
        out.append(StreamEnded(stream_id))
        return True

    def _to_h2(self, data: bytes | memoryview, out: list[Event]) -> None:
        if not data or self.closed is not None:
            return
        h = self._h2
        try:
            h2_events = h.receive_data(bytes(data))
        except h2.exceptions.ProtocolError as e:  # h2 queued a GOAWAY (none is due for a bad preface)
            self._h2_refused(e, out)
            return
        for ev in h2_events:
            self._translate(ev, out)
        if h.refused:
            refused, h.refused = h.refused, 0
            self._count_premature(refused, opened=refused, out=out)

    def _h2_refused(self, e: h2.exceptions.ProtocolError, out: list[Event]) -> None:
        self._close(ConnectionEnded(int(getattr(e, "error_code", ErrorCodes.PROTOCOL_ERROR)), str(e)), out)

    def _fail(self, code: ErrorCodes, reason: str, out: list[Event]) -> None:
        self._h2_call(self._h2.close_connection, code, additional_data=reason.encode()[:256])
        self._close(ConnectionEnded(int(code), reason), out)

    def _count_premature(self, resets: int, opened: int, out: list[Event]) -> None:
        """Streams reset before their answer (server side: see ``ServerConnection``)."""

    def _ok_received(self, stream_id: int, out: list[Event]) -> bool:
        """A HEADERS frame that is exactly ``:status: 200`` (client side: see ``ClientConnection``); False: h2
        handles the frame."""
        return False

    def _request_received(self, stream_id: int, flags: int, block: memoryview, out: list[Event]) -> bool:
        """A whole header block opening a new stream (server side: see ``ServerConnection``); False: h2
        handles the frame."""
        return False

    def _translate(self, ev: h2.events.Event, out: list[Event]) -> None:
        if self.closed is not None:
            return
        if isinstance(ev, h2.events.WindowUpdated):
            out.append(WindowOpened(ev.stream_id or 0))
        elif isinstance(ev, h2.events.StreamEnded):
            self._recv_windows.pop(ev.stream_id or 0, None)
            self._unacked.pop(ev.stream_id or 0, None)
            out.append(StreamEnded(ev.stream_id or 0))
        elif isinstance(ev, h2.events.StreamReset):
            self._stream_reset(ev.stream_id or 0, int(ev.error_code or 0), out)
        elif isinstance(ev, h2.events.DataReceived):
            # Empty: the END_STREAM this layer passes on for a DATA frame it took. Otherwise DATA on a stream
            # this layer does not take DATA for, before its response (CONNECT answers first, RFC 9113
            # §8.5): a stream error, the window given back.
            assert ev.stream_id is not None and ev.flow_controlled_length is not None
            if not ev.flow_controlled_length:
                return
            self._h2_call(self._h2.acknowledge_received_data, ev.flow_controlled_length, ev.stream_id)
            self._forget(ev.stream_id)
            if self._h2_call(self._h2.reset_stream, ev.stream_id, ErrorCodes.PROTOCOL_ERROR):
                out.append(StreamReset(ev.stream_id, int(ErrorCodes.PROTOCOL_ERROR), False))
        elif isinstance(ev, h2.events.ConnectionTerminated):
            reason = (ev.additional_data or b"").decode(errors="replace") or "GOAWAY received"
            if ev.error_code == ErrorCodes.NO_ERROR and ev.last_stream_id is not None:
                self.going_away = ev.last_stream_id
                out.append(GoAwayReceived(ev.last_stream_id, reason))
            else:
                self._close(ConnectionEnded(int(ev.error_code or 0), reason, ev.last_stream_id), out)
        else:
            self._translate_headers(ev, out)

    def _stream_reset(self, stream_id: int, code: int, out: list[Event]) -> None:
        self._forget(stream_id)
        out.append(StreamReset(stream_id, code, code == ErrorCodes.REFUSED_STREAM))

    def _translate_headers(self, ev: h2.events.Event, out: list[Event]) -> None:
        """Role-specific events (requests for a server, responses for a client)."""


def _headers(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    return {k.decode(): v.decode(errors="replace") for k, v in raw}


_RECEIVING_STATES = (ConnectionState.IDLE, ConnectionState.SERVER_OPEN)  # where h2 lets a peer open a stream
# A header h2 accepts as it is: a lowercase token name (no colon, nothing below 0x21 or from 0x7f), a value without
# NUL, CR or LF that neither starts nor ends with a space or tab (RFC 9113 §8.2.1).
_PLAIN_NAME = re.compile(rb"[a-z0-9!#$%&'*+.^_`|~-]+")
_PLAIN_VALUE = re.compile(rb"[^\x00\r\n \t]([^\x00\r\n]*[^\x00\r\n \t])?")
# Names h2 refuses or treats specially in a request (connection-specific, te, Host against :authority, cookies
# combined, content-length counted): their blocks take h2's path.
_SPECIAL_NAMES = h2.utilities.CONNECTION_HEADERS | {b"te", b"host", b"cookie", b"content-length"}


def _plain_connect(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """Whether h2 would accept a header block unchanged as an ordinary CONNECT: exactly :method CONNECT and
    :authority first, then plain headers. Any other block is for h2 to check."""
    if len(headers) < 2:
        return False
    (first, first_value), (second, second_value) = headers[0], headers[1]
    if first == b":method" and second == b":authority":
        method, authority = first_value, second_value
    elif first == b":authority" and second == b":method":
        method, authority = second_value, first_value
    else:
        return False
    if method != b"CONNECT" or _PLAIN_VALUE.fullmatch(authority) is None:
        return False
    return all(_PLAIN_NAME.fullmatch(name) is not None and name not in _SPECIAL_NAMES
               and (not value or _PLAIN_VALUE.fullmatch(value) is not None) for name, value in headers[2:])


class ServerConnection(Connection):
    def __init__(self, settings: Settings = Settings()) -> None:
        super().__init__(client_side=False, settings=settings)
        self._unanswered: set[int] = set()  # requests reported and not yet accepted or answered
        self._opened = 0  # streams the peer opened (refused ones included)
        self._premature = 0  # of those, reset by the peer before their answer, or refused

    def _request_received(self, stream_id: int, flags: int, block: memoryview, out: list[Event]) -> bool:
        """A HEADERS frame opening a new stream, read here rather than by h2 (its frame objects, events and
        per-header validation cost ~45 us a request): the block is decoded with h2's decoder, and when it is a
        plain CONNECT (``_plain_connect``), h2 takes the state transitions its own handling would; any other
        block goes through h2's validation of the stream (``receive_headers``), so what h2 refuses is refused
        alike. False (h2 handles the whole frame) for a stream h2 might refuse or anything else unusual."""
        h = self._h2
        if self._prune_due():
            self._counted(outbound=False)
        if (self.going_away is not None or not stream_id & 1 or stream_id <= h.highest_inbound_stream_id
                or h.state_machine.state not in _RECEIVING_STATES
                or len(h.streams) >= h.local_settings.max_concurrent_streams):  # may hold closed ones: h2 decides
            return False
        end_stream = bool(flags & _END_STREAM)
        try:
            raw = bytes(block)
            headers: list[Header] = (header_block.decode(h.decoder, raw)
                                     or list(h2.connection._decode_headers(h.decoder, raw)))
            plain = _plain_connect(headers)
            self._connection_input(ConnectionInputs.RECV_HEADERS)
            stream = h._begin_new_stream(stream_id, AllowedStreamIDs.ODD)
            h2_events: list[h2.events.Event]
            if not plain:
                _, h2_events = stream.receive_headers(headers, end_stream, h.config.header_encoding)
            else:  # h2's receive_headers but its checks (nor a content-length to track: none is present)
                h2_events = stream.state_machine.process_input(StreamInputs.RECV_HEADERS)
                request = h2_events[0]
                assert isinstance(request, h2.events.RequestReceived)
                request.headers = headers
                if end_stream:
                    ended = stream.state_machine.process_input(StreamInputs.RECV_END_STREAM)
                    assert isinstance(ended[0], h2.events.StreamEnded)
                    request.stream_ended = ended[0]
                    h2_events += ended
        except h2.exceptions.ProtocolError as e:  # what h2's receive_data does: GOAWAY, then the error
            h._terminate_connection(e.error_code)
            self._h2_refused(e, out)
            return True
        for ev in h2_events:
            self._translate(ev, out)
        return True

    def _translate_headers(self, ev: h2.events.Event, out: list[Event]) -> None:
        if not isinstance(ev, h2.events.RequestReceived) or ev.stream_id is None:
            return
        self._opened += 1
        headers = _headers(ev.headers or [])
        method = headers.get(":method", "")
        if self.going_away is not None:
            self.reset(ev.stream_id, ErrorCodes.REFUSED_STREAM)  # the peer is closing: no new streams
        elif method != "CONNECT":
            self._reject(ev.stream_id, 400, f"method {method!r} is not CONNECT", out)
        elif ":protocol" in headers:
            self._reject(ev.stream_id, 400, "extended CONNECT is not HBONE", out)
        else:
            try:
                authority = Authority.parse(headers.get(":authority", ""))
            except ValueError as e:
                self._reject(ev.stream_id, 400, str(e), out)
                return
            if ev.stream_ended is None:
                self._recv_windows[ev.stream_id] = self.settings.stream_window
            self._unanswered.add(ev.stream_id)
            out.append(ConnectRequest(ev.stream_id, authority, headers))

    def _stream_reset(self, stream_id: int, code: int, out: list[Event]) -> None:
        super()._stream_reset(stream_id, code, out)
        if stream_id in self._unanswered:
            self._unanswered.discard(stream_id)
            self._count_premature(1, opened=0, out=out)

    def _count_premature(self, resets: int, opened: int, out: list[Event]) -> None:
        self._premature += resets
        self._opened += opened
        if self._premature > self.settings.reset_budget and 2 * self._premature > self._opened:
            self._fail(ErrorCodes.ENHANCE_YOUR_CALM, f"{self._premature} of {self._opened} streams reset before"
                       " their answer or refused (rapid reset)", out)

    def _reject(self, stream_id: int, status: int, reason: str, out: list[Event]) -> None:
        self.respond(stream_id, status)
        out.append(RequestRejected(stream_id, status, reason))

    def accept(self, stream_id: int) -> None:
        """200: the upstream connection is up, the tunnel is open. A no-op for a stream that is gone."""
        if stream_id not in self._unanswered or self.closed is not None:
            return
        self._unanswered.discard(stream_id)
        h = self._h2
        stream = h.streams.get(stream_id)
        if (stream is not None and h.state_machine.state is ConnectionState.SERVER_OPEN
                and not h.encoder.table_size_changes and not stream.state_machine.headers_sent
                and stream.state_machine.state in (StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE)):
            # The answer is always the same one-byte header block (HPACK's static ":status: 200", no change to the
            # encoder's table): written here, h2 taking the state transitions its send_headers would (the stream's:
            # SEND_HEADERS leaves an open connection's state as it is).
            stream.state_machine.process_input(StreamInputs.SEND_HEADERS)
            self._emit(_STATUS_200_HEADER + stream_id.to_bytes(4, "big") + bytes((_STATUS_200,)))
            self._sendable.add(stream_id)
        elif self._h2_call(h.send_headers, stream_id, [(b":status", b"200")]):
            self._sendable.add(stream_id)

    def respond(self, stream_id: int, status: int) -> None:
        """A final answer that closes the stream (400, 401, 503 ...), both ways: the client's side is
        reset with NO_ERROR (RFC 9113 §8.1) so the stream gives its concurrency slot back at once."""
        if self.closed is not None:
            return
        self._unanswered.discard(stream_id)
        self._forget(stream_id)
        if not self._h2_call(self._h2.send_headers, stream_id, [(b":status", str(status).encode())],
                             end_stream=True):
            self.reset(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        stream = self._h2.streams.get(stream_id)
        if stream is not None and not stream.closed:
            self.reset(stream_id, ErrorCodes.NO_ERROR)

    def _close(self, ended: ConnectionEnded, out: list[Event] | None = None) -> None:
        super()._close(ended, out)
        self._unanswered.clear()


class ClientConnection(Connection):
    def __init__(self, settings: Settings = Settings()) -> None:
        super().__init__(client_side=True, settings=settings)

    def _at_stream_limit(self) -> bool:
        """Whether the peer's concurrent-stream limit is reached. The stream table holds the open streams and the
        closed ones not pruned yet (``_prune_due``): while it is smaller than the limit, the limit cannot be
        reached, and no count (a walk of the whole table) is needed."""
        h = self._h2
        limit = h.remote_settings.max_concurrent_streams
        if len(h.streams) < limit and not self._prune_due():
            return False
        return self._counted(outbound=True) >= limit

    def open(self, authority: Authority, headers: Mapping[str, str] | None = None) -> int | None:
        """Send a CONNECT request; returns the new stream's id, or None when no stream can be opened (the
        connection ended or is going away, or the peer's stream limit is reached). A header h2 does not allow
        (upper-case or connection-specific name, CR/LF/NUL in a value) raises ValueError. The stream can send
        DATA at once, before its answer."""
        if self.closed is not None or self.going_away is not None:
            return None
        target = str(authority).encode()
        request = [(b":method", b"CONNECT"), (b":authority", target)]
        request += [_request_header(k, v) for k, v in (headers or {}).items()]
        # What h2's send_headers does for a new stream, without its per-header validation (the request is built
        # here) and frame objects: the limit, the state transitions, then the header block (encoding changes the
        # HPACK state for good: after the transitions, as h2 orders them).
        h = self._h2
        try:
            stream_id = h.get_next_available_stream_id()
            if self._at_stream_limit():
                return None
            self._connection_input(ConnectionInputs.SEND_HEADERS)
            stream = h._begin_new_stream(stream_id, AllowedStreamIDs.ODD)
            stream.state_machine.process_input(StreamInputs.SEND_HEADERS)
        except h2.exceptions.ProtocolError:  # NoAvailableStreamIDError, or the connection cannot send
            return None
        stream._authority = target
        stream.request_method = b"CONNECT"
        self._send_header_block(stream_id, header_block.encode(h.encoder, request) or h.encoder.encode(request))
        self._sendable.add(stream_id)  # DATA may follow the HEADERS before the answer (RFC 9113 §8.5)
        return stream_id

    def _send_header_block(self, stream_id: int, block: bytes) -> None:
        """HEADERS with END_HEADERS, or HEADERS and CONTINUATIONs when the block exceeds the peer's frame size."""
        most, sid = self._h2.max_outbound_frame_size, stream_id.to_bytes(4, "big")
        chunks = [block[at:at + most] for at in range(0, len(block), most)] or [b""]
        last = len(chunks) - 1
        self._emit(b"".join(
            len(chunk).to_bytes(3, "big") + bytes((_CONTINUATION if i else _HEADERS, _END_HEADERS if i == last else 0))
            + sid + chunk for i, chunk in enumerate(chunks)))

    def _ok_received(self, stream_id: int, out: list[Event]) -> bool:
        """The 200 of a CONNECT this side sent, as a one-byte header block (how this server answers): h2's stream
        takes the state transitions its handling of the frame would (the open connection's state stays as it is, and
        a static entry changes no HPACK state); anything else (another status, more headers, a stream not waiting
        for its answer) goes to h2."""
        h = self._h2
        stream = h.streams.get(stream_id)
        if (stream is None or h.state_machine.state is not ConnectionState.CLIENT_OPEN
                or stream.state_machine.state not in (StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL)
                or stream.state_machine.headers_received):
            return False
        stream.state_machine.process_input(StreamInputs.RECV_HEADERS)
        self._established(stream_id, receiving=True)  # no END_STREAM on this HEADERS frame
        out.append(ConnectResponse(stream_id, 200, {":status": "200"}))
        return True

    @property
    def peer_stream_limit(self) -> int:
        return int(self._h2.remote_settings.max_concurrent_streams)

    def _translate_headers(self, ev: h2.events.Event, out: list[Event]) -> None:
        if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id is not None:
            headers = _headers(ev.headers or [])
            try:
                status = int(headers.get(":status", "0"))
            except ValueError:
                status = 0
            if status == 200:
                self._established(ev.stream_id, receiving=ev.stream_ended is None)
            out.append(ConnectResponse(ev.stream_id, status, headers))
