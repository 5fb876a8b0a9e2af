"""HBONE's HTTP/2 CONNECT protocol, free of I/O (in the manner of h2 and h11).

A ``ServerConnection`` or ``ClientConnection`` is fed the bytes read from the TLS session with
``receive`` and returns events; ``data_to_send`` returns the bytes to write. Everything about HTTP/2
CONNECT that does not need a socket lives here: request validation and the answers ztunnel gives
(400 bad method or authority), flow-control windows sized for throughput, the stream limit treated as
a stream error (RFC 9113 §5.1.2), END_STREAM as TCP FIN and RST_STREAM(CONNECT_ERROR) as TCP RST.
"""

from __future__ import annotations

import binascii
import contextlib
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import hyperframe.frame
from h2.errors import ErrorCodes
from hyperframe.frame import Frame, HeadersFrame, RstStreamFrame

KIB = 1024
MIB = 1024 * KIB


def _short_data_repr(data: bytes | None) -> str:
    """hyperframe's frame-data repr, with the same output, without hex-encoding the whole payload.

    h2 evaluates ``repr(frame)`` for every frame it receives, for a trace log line, whatever the log
    level; hyperframe's repr hex-encodes all of a DATA frame's payload (2 MiB of text for a 1 MiB frame)
    to keep its first 20 characters. That was over a third of the HBONE server's CPU time.
    """
    if not data:
        return "None"
    return "<hex:" + binascii.hexlify(data[:10]).decode("ascii") + ("..." if len(data) > 10 else "") + ">"


hyperframe.frame._raw_data_repr = _short_data_repr


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


@dataclass(frozen=True, slots=True)
class Authority:
    """A CONNECT target ``ip:port`` (``[v6]:port`` for IPv6)."""

    ip: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Authority:
        host, sep, port_text = text.rpartition(":")
        if not sep or not port_text.isdigit():
            raise ValueError(f"authority {text!r} is not ip:port")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"authority {text!r} does not name an IP address") from None
        port = int(port_text)
        if not 0 < port < 65536:
            raise ValueError(f"authority {text!r} has port out of range")
        return cls(str(ip), port)

    def __str__(self) -> str:
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"


# Events handed to the I/O layer.
@dataclass(frozen=True, slots=True)
class ConnectRequest:
    stream_id: int
    authority: Authority
    headers: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class RequestRejected:
    """A request this layer answered itself (status 400); reported so the I/O layer can log it."""

    stream_id: int
    status: int
    reason: str


@dataclass(frozen=True, slots=True)
class ConnectResponse:
    stream_id: int
    status: int
    headers: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class Data:
    stream_id: int
    data: bytes
    flow_length: int  # what to acknowledge once the data has been passed on


@dataclass(frozen=True, slots=True)
class StreamEnded:
    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    stream_id: int
    error_code: int
    refused: bool  # REFUSED_STREAM: the peer never processed it, the stream may be retried


@dataclass(frozen=True, slots=True)
class WindowOpened:
    stream_id: int  # 0: the connection window


@dataclass(frozen=True, slots=True)
class ConnectionEnded:
    """The connection ended (GOAWAY received or sent after a protocol error); ``reason`` says why."""

    error_code: int
    reason: str
    last_stream_id: int | None = None


Event = (ConnectRequest | RequestRejected | ConnectResponse | Data | StreamEnded | StreamReset | WindowOpened
         | ConnectionEnded)


class _H2(h2.connection.H2Connection):
    """h2 with the concurrent-stream limit enforced per stream, as RFC 9113 §5.1.2 requires.

    h2 raises TooManyStreamsError, a connection error that would take every other stream down with the
    offending one. Here the excess stream alone is refused, after its header block has been decoded so
    that the HPACK state stays in step with the peer.
    """

    def _receive_headers_frame(self, frame: HeadersFrame) -> tuple[list[Frame], list[h2.events.Event]]:
        try:
            return super()._receive_headers_frame(frame)
        except h2.exceptions.TooManyStreamsError:
            self.decoder.decode(frame.data, raw=True)
            self.highest_inbound_stream_id = max(self.highest_inbound_stream_id, frame.stream_id)
            rst = RstStreamFrame(frame.stream_id)
            rst.error_code = ErrorCodes.REFUSED_STREAM
            return [rst], []


class _Connection:
    """What client and server share: data, half-close, resets, flow control."""

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

    # -- output
    def data_to_send(self) -> bytes:
        return self._h2.data_to_send()

    def send(self, stream_id: int, data: bytes | memoryview) -> int:
        """Send as much of ``data`` as the flow-control windows allow; returns how much was taken."""
        h = self._h2
        room = min(len(data), h.local_flow_control_window(stream_id))
        frame = h.max_outbound_frame_size
        sent = 0
        while sent < room:
            chunk = min(frame, room - sent)
            h.send_data(stream_id, data[sent:sent + chunk])
            sent += chunk
        return sent

    def window(self, stream_id: int) -> int:
        return self._h2.local_flow_control_window(stream_id)

    def end(self, stream_id: int) -> None:
        """Half-close: END_STREAM, the HTTP/2 form of TCP FIN."""
        self._h2.end_stream(stream_id)

    def reset(self, stream_id: int, code: ErrorCodes = ErrorCodes.CONNECT_ERROR) -> None:
        """RST_STREAM; CONNECT_ERROR (the default) is how HTTP/2 carries a TCP reset."""
        with contextlib.suppress(h2.exceptions.StreamClosedError):
            self._h2.reset_stream(stream_id, code)

    def ack(self, stream_id: int, flow_length: int) -> None:
        """Data received on ``stream_id`` was passed on: let the peer send that much more."""
        try:
            self._h2.acknowledge_received_data(flow_length, stream_id)
        except h2.exceptions.StreamClosedError:
            # The stream is gone; the connection window still needs the bytes back.
            self._h2.increment_flow_control_window(flow_length)

    def goaway(self, code: ErrorCodes = ErrorCodes.NO_ERROR) -> None:
        self._h2.close_connection(code)

    @property
    def open_streams(self) -> int:
        return self._h2.open_outbound_streams + self._h2.open_inbound_streams

    # -- input
    def receive(self, data: bytes) -> list[Event]:
        try:
            h2_events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as e:  # h2 has queued a GOAWAY already
            self.closed = ConnectionEnded(getattr(e, "error_code", ErrorCodes.PROTOCOL_ERROR), str(e))
            return [self.closed]
        out: list[Event] = []
        for ev in h2_events:
            self._translate(ev, out)
        return out

    def _translate(self, ev: h2.events.Event, out: list[Event]) -> None:
        if isinstance(ev, h2.events.DataReceived):
            assert ev.stream_id is not None and ev.data is not None and ev.flow_controlled_length is not None
            out.append(Data(ev.stream_id, ev.data, ev.flow_controlled_length))
        elif isinstance(ev, h2.events.StreamEnded):
            out.append(StreamEnded(ev.stream_id or 0))
        elif isinstance(ev, h2.events.WindowUpdated):
            out.append(WindowOpened(ev.stream_id or 0))
        elif isinstance(ev, h2.events.StreamReset):
            code = int(ev.error_code or 0)
            out.append(StreamReset(ev.stream_id or 0, code, code == ErrorCodes.REFUSED_STREAM))
        elif isinstance(ev, h2.events.ConnectionTerminated):
            reason = (ev.additional_data or b"").decode(errors="replace") or "GOAWAY received"
            self.closed = ConnectionEnded(int(ev.error_code or 0), reason, ev.last_stream_id)
            out.append(self.closed)
        else:
            self._translate_headers(ev, out)

    def _translate_headers(self, ev: h2.events.Event, out: list[Event]) -> None:
        """Role-specific events (requests for a server, responses for a client)."""


def _headers(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    return {k.decode(): v.decode(errors="replace") for k, v in raw}


class ServerConnection(_Connection):
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
            out.append(ConnectRequest(ev.stream_id, authority, headers))

    def _reject(self, stream_id: int, status: int, reason: str, out: list[Event]) -> None:
        self.respond(stream_id, status)
        out.append(RequestRejected(stream_id, status, reason))

    def accept(self, stream_id: int) -> None:
        """200: the upstream connection is up, the tunnel is open."""
        self._h2.send_headers(stream_id, [(b":status", b"200")])

    def respond(self, stream_id: int, status: int) -> None:
        """A final answer that closes the stream (400, 401, 503 ...)."""
        try:
            self._h2.send_headers(stream_id, [(b":status", str(status).encode())], end_stream=True)
        except h2.exceptions.ProtocolError:
            self.reset(stream_id, ErrorCodes.REFUSED_STREAM)


class ClientConnection(_Connection):
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
            out.append(ConnectResponse(ev.stream_id, status, headers))
