"""An HTTP/2 connection on an asyncio transport, as gRPC's client and server both use it.

h2 keeps the protocol (HPACK, SETTINGS, PING, stream states, windows); this layer feeds it what is read, writes
what it queues, and lets coroutines send a stream's DATA as the peer's flow-control windows and the transport's
back-pressure allow. Received DATA is acknowledged as soon as it is taken (a gRPC message is bounded by the
reader's limit, not by the window). A peer that breaks HTTP/2 gets a GOAWAY naming the error and the connection
ends; every other connection is unaffected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes

log = logging.getLogger(__name__)

MAX_CONCURRENT_STREAMS = 100
MAX_HEADER_LIST_SIZE = 16 * 1024


class ConnectionClosed(Exception):
    """The connection ended while a stream was still sending."""


class H2Protocol(asyncio.Protocol):
    """The connection; subclasses handle its events (``event``) and its end (``ended``)."""

    def __init__(self, client_side: bool) -> None:
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=client_side,
                                                                       header_encoding=None))
        codes = h2.settings.SettingCodes
        local = {codes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS, codes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_SIZE}
        if client_side:
            local[codes.ENABLE_PUSH] = 0
        self.h2.local_settings = h2.settings.Settings(client=client_side, initial_values=local)
        self.h2.decoder.max_header_list_size = MAX_HEADER_LIST_SIZE
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._writable = asyncio.Event()
        self._writable.set()
        self._window_opened = asyncio.Event()  # replaced by a new one each time it is set: wakes every waiter

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's TLS transport is not one by class)
        self.h2.initiate_connection()
        self.flush()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as e:  # h2 queued a GOAWAY naming the error
            log.info("%s: HTTP/2 error, closing the connection: %s", self.peer_name, e)
            self.flush()
            self.close()
            return
        for event in events:
            if isinstance(event, h2.events.DataReceived) and event.flow_controlled_length:
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
                self._open_window()
            self.event(event)
            if self.closed:
                return
        self.flush()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._writable.set()
        self._open_window()
        self.ended(exc)
        # The transport (and a TLS transport's buffers, 256 KiB in uvloop's) and this protocol refer to each other:
        # let go here rather than at the next full collection, which may be hours away (gc.freeze).
        self.transport = None

    # -- for subclasses
    @property
    def peer_name(self) -> str:
        return str(self.transport.get_extra_info("peername") if self.transport is not None else None)

    def event(self, event: h2.events.Event) -> None:
        raise NotImplementedError

    def ended(self, exc: Exception | None) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        out = self.h2.data_to_send()
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out)

    def close(self) -> None:
        """GOAWAY (unless the connection has ended), then close: a peer that is told closes its side, and so lets
        the TLS shutdown end at once (grpc's server answers no close_notify)."""
        if not self.closed and self.transport is not None:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.h2.close_connection()
            self.flush()
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _open_window(self) -> None:
        opened, self._window_opened = self._window_opened, asyncio.Event()
        opened.set()

    async def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        """Send ``data`` on ``stream_id`` as the windows open (ConnectionClosed if the connection ends first; h2's
        StreamClosedError if the peer resets the stream)."""
        view = memoryview(data)
        while True:
            if self.closed:
                raise ConnectionClosed("the connection ended")
            await self._writable.wait()
            size = min(len(view), self.h2.local_flow_control_window(stream_id), self.h2.max_outbound_frame_size)
            if size <= 0 and view:
                await self._window_opened.wait()
                continue
            last = size == len(view)
            self.h2.send_data(stream_id, view[:size].tobytes(), end_stream=end_stream and last)
            self.flush()
            if last:
                return
            view = view[size:]

    def reset(self, stream_id: int, code: ErrorCodes = ErrorCodes.CANCEL) -> None:
        """RST_STREAM, unless the stream has closed already."""
        try:
            self.h2.reset_stream(stream_id, code)
        except h2.exceptions.ProtocolError:
            return
        self.flush()
