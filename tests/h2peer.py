"""A raw HTTP/2 peer for tests: h2's H2Connection driven directly, free to break HBONE's rules.

``raw_client`` is the sans-IO endpoint; ``TlsH2Peer`` runs one over a real TLS connection with asyncio
streams, every wait bounded by a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable, Sequence

import h2.config
import h2.connection
import h2.events

Address = tuple[str, int]
Header = tuple[bytes, bytes]


class LimitIgnoringH2(h2.connection.H2Connection):
    """An h2 client that opens streams past the peer's SETTINGS_MAX_CONCURRENT_STREAMS."""

    @property
    def open_outbound_streams(self) -> int:
        return 0


def raw_client(*, ignore_limit: bool = False) -> h2.connection.H2Connection:
    """A client-side H2Connection (preface queued) that sends whatever headers it is given."""
    config = h2.config.H2Configuration(client_side=True, header_encoding=None, validate_outbound_headers=False,
                                       normalize_outbound_headers=False)
    conn = (LimitIgnoringH2 if ignore_limit else h2.connection.H2Connection)(config=config)
    conn.initiate_connection()
    return conn


def connect_headers(authority: str, *extra: Header, method: bytes = b"CONNECT") -> list[Header]:
    return [(b":method", method), (b":authority", authority.encode()), *extra]


def status_of(events: Sequence[object], stream_id: int) -> int | None:
    for ev in events:
        if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == stream_id:
            return int(dict(ev.headers or [])[b":status"])
    return None


class TlsH2Peer:
    """A raw h2 client over TLS; ``events`` keeps everything received so far."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 conn: h2.connection.H2Connection) -> None:
        self.reader, self.writer, self.conn = reader, writer, conn
        self.events: list[h2.events.Event] = []
        self.eof = False

    @classmethod
    async def connect(cls, address: Address, ctx: ssl.SSLContext, *, ignore_limit: bool = False,
                      within: float = 5.0) -> TlsH2Peer:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(*address, ssl=ctx), within)
        peer = cls(reader, writer, raw_client(ignore_limit=ignore_limit))
        await peer.flush()
        await peer.wait_for(lambda ev: isinstance(ev, h2.events.RemoteSettingsChanged), within)
        return peer

    async def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)
            await asyncio.wait_for(self.writer.drain(), 5.0)

    async def wait_for(self, done: Callable[[h2.events.Event], bool], within: float = 5.0) -> h2.events.Event:
        """Read until an event satisfies ``done`` (also among those already received); returns it."""
        seen = 0
        async with asyncio.timeout(within):
            while True:
                for ev in self.events[seen:]:
                    if done(ev):
                        return ev
                seen = len(self.events)
                if self.eof:
                    raise ConnectionError(f"connection closed; events so far: {self.events}")
                await self._read()

    async def read_to_eof(self, within: float = 5.0) -> None:
        async with asyncio.timeout(within):
            while not self.eof:
                await self._read()

    async def _read(self) -> None:
        try:
            data = await self.reader.read(1 << 16)
        except (ConnectionError, ssl.SSLError):
            data = b""
        if not data:
            self.eof = True
            return
        events = self.conn.receive_data(data)
        for ev in events:  # consumed at once: hand the window back
            if isinstance(ev, h2.events.DataReceived) and ev.flow_controlled_length and ev.stream_id:
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        self.events += events
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self.flush()

    def status(self, stream_id: int) -> int | None:
        return status_of(self.events, stream_id)

    async def response(self, stream_id: int, within: float = 5.0) -> int:
        """Wait for the answer on ``stream_id``; returns its status."""
        await self.wait_for(lambda ev: isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == stream_id,
                            within)
        status = self.status(stream_id)
        assert status is not None
        return status

    async def body(self, stream_id: int, within: float = 5.0) -> bytes:
        """Wait for END_STREAM on ``stream_id``; returns the data received on it."""
        await self.wait_for(lambda ev: isinstance(ev, h2.events.StreamEnded) and ev.stream_id == stream_id, within)
        return b"".join(ev.data or b"" for ev in self.events
                        if isinstance(ev, h2.events.DataReceived) and ev.stream_id == stream_id)

    async def close(self) -> None:
        self.writer.close()
        try:
            async with asyncio.timeout(2.0):
                await self.writer.wait_closed()
        except (ConnectionError, ssl.SSLError, TimeoutError):
            pass
