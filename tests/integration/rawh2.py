"""A raw HTTP/2 client over real TLS for hostile-peer tests: frames are written byte by byte as the test
says, not as an HTTP/2 library would allow; what the server sends is parsed into ``RawFrame``s."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import hpack

Address = tuple[str, int]
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0, 1, 3, 4, 6, 7, 8, 9
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream_id.to_bytes(4, "big") + payload


def rst_stream(stream_id: int, code: int = 0x8) -> bytes:  # CANCEL
    return frame(RST_STREAM, 0, stream_id, code.to_bytes(4, "big"))


def goaway(last_stream_id: int, code: int = 0) -> bytes:
    return frame(GOAWAY, 0, 0, last_stream_id.to_bytes(4, "big") + code.to_bytes(4, "big"))


def ping(opaque: int = 0) -> bytes:
    return frame(PING, 0, 0, opaque.to_bytes(8, "big"))


@dataclass
class RawFrame:
    kind: int
    flags: int
    stream_id: int
    payload: bytes
    headers: dict[bytes, bytes] = field(default_factory=dict)  # HEADERS: the decoded block

    @property
    def error_code(self) -> int:
        """RST_STREAM's or GOAWAY's error code."""
        return int.from_bytes(self.payload[4:8] if self.kind == GOAWAY else self.payload[:4], "big")


class RawPeer:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.encoder, self.decoder = hpack.Encoder(), hpack.Decoder()
        self.frames: list[RawFrame] = []
        self.eof = False
        self._buf = b""

    @classmethod
    async def connect(cls, address: Address, ctx: ssl.SSLContext, *, preface: bool = True,
                      sock_options: Sequence[tuple[int, int, int]] = ()) -> RawPeer:
        """TLS to ``address``; ``preface``: send the client preface and an empty SETTINGS right away."""
        import socket
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        for level, option, value in sock_options:
            sock.setsockopt(level, option, value)
        sock.setblocking(False)
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, address), 5)
        reader, writer = await asyncio.wait_for(asyncio.open_connection(sock=sock, ssl=ctx, server_hostname=""), 5)
        peer = cls(reader, writer)
        if preface:
            peer.write(PREFACE + frame(SETTINGS, 0, 0))
        return peer

    def write(self, *chunks: bytes) -> None:
        self.writer.write(b"".join(chunks))

    def headers(self, stream_id: int, fields: Sequence[tuple[str, str]], *, end_stream: bool = False) -> bytes:
        block = self.encoder.encode([(k.encode(), v.encode()) for k, v in fields])
        return frame(HEADERS, END_HEADERS | (END_STREAM if end_stream else 0), stream_id, block)

    def connect_request(self, stream_id: int, authority: str, *, end_stream: bool = False) -> bytes:
        return self.headers(stream_id, [(":method", "CONNECT"), (":authority", authority)], end_stream=end_stream)

    async def read_until(self, done: Callable[[RawFrame], bool], within: float = 5.0) -> RawFrame:
        """Read until a frame satisfies ``done`` (also among those already read); returns it."""
        seen = 0
        async with asyncio.timeout(within):
            while True:
                for f in self.frames[seen:]:
                    if done(f):
                        return f
                seen = len(self.frames)
                if self.eof:
                    raise ConnectionError(f"closed; frames so far: {[(f.kind, f.stream_id) for f in self.frames]}")
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
        self._buf += data
        while len(self._buf) >= 9:
            length = int.from_bytes(self._buf[:3], "big")
            if len(self._buf) < 9 + length:
                break
            f = RawFrame(self._buf[3], self._buf[4], int.from_bytes(self._buf[5:9], "big") & 0x7FFFFFFF,
                         self._buf[9:9 + length])
            self._buf = self._buf[9 + length:]
            if f.kind == HEADERS:
                f.headers = dict(self.decoder.decode(f.payload, raw=True))
            self.frames.append(f)

    def goaway(self) -> RawFrame | None:
        return next((f for f in self.frames if f.kind == GOAWAY), None)

    def body(self, stream_id: int) -> bytes:
        return b"".join(f.payload for f in self.frames if f.kind == DATA and f.stream_id == stream_id)

    def ended(self, stream_id: int) -> bool:
        return any(f.stream_id == stream_id and f.kind in (DATA, HEADERS) and f.flags & END_STREAM
                   for f in self.frames)

    async def close(self) -> None:
        self.writer.close()
        try:
            async with asyncio.timeout(2.0):
                await self.writer.wait_closed()
        except (ConnectionError, ssl.SSLError, TimeoutError):
            pass
