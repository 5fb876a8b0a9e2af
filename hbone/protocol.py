"""HBONE's HTTP/2 CONNECT protocol, free of I/O (in the manner of h2 and h11).

A ``ServerConnection`` or ``ClientConnection`` is fed the bytes read from the TLS session with
``receive`` and returns events; ``data_to_send`` returns the bytes to write. Everything about HTTP/2
CONNECT that does not need a socket lives here: request validation and the answers ztunnel gives
(400 bad method or authority), flow-control windows sized for throughput, the stream limit treated as
a stream error (RFC 9113 §5.1.2), END_STREAM as TCP FIN and RST_STREAM(CONNECT_ERROR) as TCP RST.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import hpack
from h2.errors import ErrorCodes
from h2.frame_buffer import FrameBuffer
from hyperframe.frame import DataFrame, Frame, HeadersFrame, RstStreamFrame

from hbone.authority import Authority
from hbone.events import (
    ConnectionEnded,
    ConnectRequest,
    ConnectResponse,
    Data,
    Event,
    RequestRejected,
    StreamEnded,
    StreamReset,
    WindowOpened,
)

KIB = 1024
MIB = 1024 * KIB


@dataclass(frozen=True, slots=True)
class Settings:
    """HTTP/2 parameters; defaults are ztunnel's (4 MiB stream, 16 MiB connection windows, 1 MiB frames)."""

    stream_window: int = 4 * MIB
    connection_window: int = 16 * MIB
    max_frame_size: int = 1 * MIB
    max_concurrent_streams: int = 200  # what a server allows
    max_header_list_size: int = 16 * KIB


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


class _H2(h2.connection.H2Connection):
    """h2 with the concurrent-stream limit enforced per stream, as RFC 9113 §5.1.2 requires.

    h2 raises TooManyStreamsError, a connection error that would take every other stream down with the
    offending one. Here the excess stream alone is refused, after its header block has been decoded so
    that the HPACK state stays in step with the peer. Received DATA frames are parsed as
    ``_QuietDataFrame``s by this connection's own frame buffer.
    """

    def __init__(self, config: h2.config.H2Configuration) -> None:
        super().__init__(config=config)
        self.incoming_buffer = _FrameBuffer(server=not config.client_side)
        self._frame_dispatch_table[_QuietDataFrame] = self._receive_data_frame

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
            rst = RstStreamFrame(frame.stream_id)
            rst.error_code = ErrorCodes.REFUSED_STREAM
            return [rst], []


_DATA, _HEADERS, _PUSH_PROMISE, _CONTINUATION = 0x0, 0x1, 0x5, 0x9
_END_STREAM, _END_HEADERS, _PADDED = 0x1, 0x4, 0x8
_PREFACE_LENGTH = 24
_WINDOW_UPDATE_HEADER = b"\x00\x00\x04\x08\x00"


def _window_update(stream_id: int, increment: int) -> bytes:
    return _WINDOW_UPDATE_HEADER + stream_id.to_bytes(4, "big") + increment.to_bytes(4, "big")


class Connection:
    """What client and server share: data, half-close, resets, flow control.

    h2 owns the connection's state: HPACK, SETTINGS, stream states, RST_STREAM, GOAWAY, PING. DATA on an
    established stream takes a shorter path that h2's per-frame objects and copies made the bottleneck
    of the tunnel (about 22 us of Python per 1 KB message, four copies of every payload sent): frames
    are written and parsed here, received payloads are passed on as views of the bytes read, and this
    layer keeps the inbound windows and sends the WINDOW_UPDATEs. Two rules keep h2's view true: every
    byte sent is taken off h2's outbound windows as its own ``send_data`` would, and a DATA frame with
    END_STREAM reaches h2 as an empty END_STREAM frame, so that h2 still tracks every stream's state.
    """

    def __init__(self, client_side: bool, settings: Settings) -> None:
        self.settings = settings
        config = h2.config.H2Configuration(client_side=client_side, header_encoding=None,
                                           validate_inbound_headers=True)
        self._h2 = _H2(config=config)
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
        self._out: list[bytes | memoryview] = []
        self._partial = b""  # received bytes short of a whole frame
        self._preface = 0 if client_side else _PREFACE_LENGTH  # client preface bytes still owed to h2
        self._in_header_block = False  # HEADERS seen without END_HEADERS: CONTINUATION must follow
        self._recv_conn_window = settings.connection_window
        self._unacked_conn = 0
        self._recv_windows: dict[int, int] = {}  # streams whose DATA this layer takes -> window left
        self._unacked: dict[int, int] = {}
        self._sendable: set[int] = set()  # streams this layer may send DATA on

    # -- output
    def _emit(self, chunk: bytes | memoryview) -> None:
        """Queue ``chunk`` after whatever h2 has already queued, keeping frames in order."""
        pending = self._h2.data_to_send()
        if pending:
            self._out.append(pending)
        self._out.append(chunk)

    def data_to_send(self) -> bytes:
        pending = self._h2.data_to_send()
        if not self._out:
            return pending
        if pending:
            self._out.append(pending)
        out = b"".join(self._out)
        self._out.clear()
        return out

    def send(self, stream_id: int, data: bytes | memoryview) -> int:
        """Send as much of ``data`` as the flow-control windows allow; returns how much was taken (0 also
        when the stream can take no more: ended, reset, or its connection going away)."""
        if stream_id not in self._sendable:
            return 0
        h = self._h2
        stream = h.streams[stream_id]
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
        return self._h2.local_flow_control_window(stream_id)

    def end(self, stream_id: int) -> None:
        """Half-close: END_STREAM, the HTTP/2 form of TCP FIN."""
        self._sendable.discard(stream_id)
        self._h2.end_stream(stream_id)

    def reset(self, stream_id: int, code: ErrorCodes = ErrorCodes.CONNECT_ERROR) -> None:
        """RST_STREAM; CONNECT_ERROR (the default) is how HTTP/2 carries a TCP reset."""
        self._forget(stream_id)
        with contextlib.suppress(h2.exceptions.StreamClosedError):
            self._h2.reset_stream(stream_id, code)

    def ack(self, stream_id: int, flow_length: int) -> None:
        """Data received on ``stream_id`` was passed on: let the peer send that much more."""
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
        self._h2.close_connection(code)

    @property
    def open_streams(self) -> int:
        return self._h2.open_outbound_streams + self._h2.open_inbound_streams

    def _established(self, stream_id: int, receiving: bool) -> None:
        """A stream whose DATA now takes the short path (both ways, or only outbound)."""
        self._sendable.add(stream_id)
        if receiving:
            self._recv_windows[stream_id] = self.settings.stream_window

    def _forget(self, stream_id: int) -> None:
        self._sendable.discard(stream_id)
        self._recv_windows.pop(stream_id, None)
        self._unacked.pop(stream_id, None)

    # -- input
    def receive(self, data: bytes) -> list[Event]:
        out: list[Event] = []
        try:
            self._receive(data, out)
        except ProtocolError as e:
            self._fail(e.code, str(e), out)
        return out

    def _receive(self, data: bytes, out: list[Event]) -> None:
        if self._preface:
            head, data = data[:self._preface], data[self._preface:]
            self._preface -= len(head)
            self._to_h2(head, out)
        buf = self._partial + data if self._partial else data
        size, pos, run = len(buf), 0, -1  # run: start of frames queued for h2
        view = memoryview(buf)
        max_frame = self.settings.max_frame_size
        while size - pos >= 9 and self.closed is None:
            length = int.from_bytes(view[pos:pos + 3], "big")
            if length > max_frame:
                self._fail(ErrorCodes.FRAME_SIZE_ERROR, f"frame of {length} bytes exceeds {max_frame}", out)
                return
            end = pos + 9 + length
            if end > size:
                break
            kind, flags = buf[pos + 3], buf[pos + 4]
            stream_id = int.from_bytes(view[pos + 5:pos + 9], "big") & 0x7FFFFFFF
            if kind == _DATA and not self._in_header_block:
                if run >= 0:  # frames before this one may open (or reset) its stream: h2 sees them first
                    self._to_h2(view[run:pos], out)
                    run = -1
                if stream_id in self._recv_windows:
                    self._take_data(stream_id, flags, view[pos + 9:end], length, out)
                else:
                    self._to_h2(view[pos:end], out)
            else:
                if kind in (_HEADERS, _PUSH_PROMISE, _CONTINUATION):
                    self._in_header_block = not flags & _END_HEADERS
                if run < 0:
                    run = pos
            pos = end
        if run >= 0 and self.closed is None:
            self._to_h2(view[run:pos], out)
        self._partial = bytes(view[pos:]) if pos < size else b""

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
            self._to_h2(b"\x00\x00\x00\x00\x01" + stream_id.to_bytes(4, "big"), out)

    def _to_h2(self, data: bytes | memoryview, out: list[Event]) -> None:
        if not data or self.closed is not None:
            return
        try:
            h2_events = self._h2.receive_data(bytes(data))
        except h2.exceptions.ProtocolError as e:  # h2 queued a GOAWAY (none is due for a bad preface)
            self.closed = ConnectionEnded(getattr(e, "error_code", ErrorCodes.PROTOCOL_ERROR), str(e))
            out.append(self.closed)
            return
        for ev in h2_events:
            self._translate(ev, out)

    def _fail(self, code: ErrorCodes, reason: str, out: list[Event]) -> None:
        self._h2.close_connection(code, additional_data=reason.encode()[:256])
        self.closed = ConnectionEnded(int(code), reason)
        out.append(self.closed)

    def _translate(self, ev: h2.events.Event, out: list[Event]) -> None:
        if isinstance(ev, h2.events.WindowUpdated):
            out.append(WindowOpened(ev.stream_id or 0))
        elif isinstance(ev, h2.events.StreamEnded):
            self._recv_windows.pop(ev.stream_id or 0, None)
            out.append(StreamEnded(ev.stream_id or 0))
        elif isinstance(ev, h2.events.StreamReset):
            self._forget(ev.stream_id or 0)
            code = int(ev.error_code or 0)
            out.append(StreamReset(ev.stream_id or 0, code, code == ErrorCodes.REFUSED_STREAM))
        elif isinstance(ev, h2.events.DataReceived):  # before the stream was established: rare, h2 counted it
            assert ev.stream_id is not None and ev.data is not None and ev.flow_controlled_length is not None
            self._h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            out.append(Data(ev.stream_id, ev.data, 0))
        elif isinstance(ev, h2.events.ConnectionTerminated):
            reason = (ev.additional_data or b"").decode(errors="replace") or "GOAWAY received"
            self._sendable.clear()
            self._recv_windows.clear()
            self.closed = ConnectionEnded(int(ev.error_code or 0), reason, ev.last_stream_id)
            out.append(self.closed)
        else:
            self._translate_headers(ev, out)

    def _translate_headers(self, ev: h2.events.Event, out: list[Event]) -> None:
        """Role-specific events (requests for a server, responses for a client)."""


def _headers(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    return {k.decode(): v.decode(errors="replace") for k, v in raw}


class ServerConnection(Connection):
    def __init__(self, settings: Settings = Settings()) -> None:
        super().__init__(client_side=False, settings=settings)

    def _translate_headers(self, ev: h2.events.Event, out: list[Event]) -> None:
        if not isinstance(ev, h2.events.RequestReceived) or ev.stream_id is None:
            return
        headers = _headers(ev.headers or [])
        method = headers.get(":method", "")
        if method != "CONNECT":
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
            out.append(ConnectRequest(ev.stream_id, authority, headers))

    def _reject(self, stream_id: int, status: int, reason: str, out: list[Event]) -> None:
        self.respond(stream_id, status)
        out.append(RequestRejected(stream_id, status, reason))

    def accept(self, stream_id: int) -> None:
        """200: the upstream connection is up, the tunnel is open."""
        self._h2.send_headers(stream_id, [(b":status", b"200")])
        self._sendable.add(stream_id)

    def respond(self, stream_id: int, status: int) -> None:
        """A final answer that closes the stream (400, 401, 503 ...), both ways: the client's side is
        reset with NO_ERROR (RFC 9113 §8.1) so the stream gives its concurrency slot back at once."""
        self._forget(stream_id)
        try:
            self._h2.send_headers(stream_id, [(b":status", str(status).encode())], end_stream=True)
        except h2.exceptions.ProtocolError:
            self.reset(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        stream = self._h2.streams.get(stream_id)
        if stream is not None and not stream.closed:
            self.reset(stream_id, ErrorCodes.NO_ERROR)


class ClientConnection(Connection):
    def __init__(self, settings: Settings = Settings()) -> None:
        super().__init__(client_side=True, settings=settings)

    def open(self, authority: Authority, headers: Mapping[str, str] | None = None) -> int:
        """Send a CONNECT request; returns the new stream's id."""
        stream_id = self._h2.get_next_available_stream_id()
        request = [(b":method", b"CONNECT"), (b":authority", str(authority).encode())]
        request += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
        self._h2.send_headers(stream_id, request)
        return stream_id

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
