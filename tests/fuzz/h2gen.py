"""A structure-aware generator of what a hostile HBONE client sends: HTTP/2 frames, valid and not, mixed
with valid traffic (CONNECT, DATA, END_STREAM), HPACK blocks (valid, split over CONTINUATIONs, or garbage),
windows, stream states, and the floods of issue 17, cut into reads at arbitrary points.

It draws every choice from a ``Source``: atheris's FuzzedDataProvider when coverage-guided (the input
bytes steer the structure), or a seeded ``random.Random`` for the socket campaign and CI."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from typing import Protocol

import hpack

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20


class Source(Protocol):
    def pick(self, lo: int, hi: int) -> int:
        """An integer in [lo, hi]."""

    def blob(self, n: int) -> bytes:
        """Up to ``n`` bytes."""


class RandomSource:
    def __init__(self, seed: int) -> None:
        self._r = random.Random(seed)

    def pick(self, lo: int, hi: int) -> int:
        return self._r.randint(lo, hi)

    def blob(self, n: int) -> bytes:
        return self._r.randbytes(n)


_LITERAL_BLOCKS: dict[str, bytes] = {}


def literal_connect(authority: str) -> bytes:
    """A CONNECT header block that refers to no dynamic-table entry (valid in any HPACK state), encoded once:
    encoding is most of a session's cost, and most requests need not differ."""
    block = _LITERAL_BLOCKS.get(authority)
    if block is None:
        block = _LITERAL_BLOCKS[authority] = hpack.Encoder().encode(
            [(b":method", b"CONNECT"), (b":authority", authority.encode())])
    return block


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    header = len(payload).to_bytes(3, "big") + bytes([kind, flags]) + (stream_id & 0xFFFFFFFF).to_bytes(4, "big")
    return header + payload


class ClientScript:
    """One hostile client's bytes. ``authority`` is a target the server accepts; others are drawn too."""

    def __init__(self, src: Source, authority: str, *, responses: bool = False) -> None:
        self.src, self.authority, self.responses = src, authority, responses
        self.encoder = hpack.Encoder()
        # A quarter of the sessions break rules at every turn; the others mostly follow them, so that the
        # deeper states (open streams, flow control, half-closes) are reached before a connection error.
        self.wild = src.pick(0, 3) == 3
        self.next_id = 1
        self.streams: list[int] = [1, 3, 5] if responses else []  # responses: streams our client side opened
        self.out: list[bytes] = []

    # -- building blocks
    def _rare(self) -> bool:
        """Whether to break a rule this time."""
        high = 2 if self.wild else 24
        return self.src.pick(0, high) == high  # an exhausted source gives 0: the rule-abiding choice

    def _stream(self) -> int:
        """A stream id: one this client opened (opening one if need be), or, breaking rules, any."""
        if self._rare():
            return [0, self.next_id, self.src.pick(0, 0x7FFFFFFF)][self.src.pick(0, 2)]
        if not self.streams:
            self.connect()
        return self.streams[self.src.pick(0, len(self.streams) - 1)]

    def _size(self, big: int) -> int:
        """Mostly small, sometimes up to ``big``: large inputs are slow and rarely find more."""
        pick = self.src.pick(0, 15)
        if pick < 3:
            return pick
        if pick < 10:
            return self.src.pick(0, 64)
        if pick < 14:
            return self.src.pick(0, min(big, 2048))
        return self.src.pick(0, big)

    def _block(self) -> bytes:
        """A header block: a CONNECT (valid or not), extra fields, or garbage."""
        kind = self.src.pick(0, 9) if self._rare() else self.src.pick(0, 4)
        if kind == 0 and not self.responses:
            return literal_connect(self.authority)
        if kind == 9:
            return self.src.blob(self._size(4096))
        if self.responses and kind < 6:  # the peer is a server: responses, valid or not
            status = [b"200", b"200", b"401", b"503", b"100", b"abc"][self.src.pick(0, 5)]
            return self.encoder.encode([(b":status", status)] + [(b"x", b"y")] * self.src.pick(0, 2))
        method = "CONNECT" if kind < 7 else ["GET", "POST", "", "CONNECT "][self.src.pick(0, 3)]
        authority = self.authority if kind < 5 else [
            "10.0.0.1:80", "[::1]:1", "127.0.0.1:0", "host:80", "", "1.2.3.4:99999", self.authority + "\n",
            "[" + "f" * 50 + "]:1"][self.src.pick(0, 7)]
        fields = [(b":method", method.encode()), (b":authority", authority.encode())]
        for _ in range(self.src.pick(0, 3)):
            name = [b"forwarded", b"baggage", b"traceparent", b":path", b":scheme", b":protocol", b"Upper",
                    b"x-big", b"connection", b"te"][self.src.pick(0, 9) if self._rare() else self.src.pick(0, 2)]
            value = b"v" * self._size(20000) if name == b"x-big" else self.src.blob(self.src.pick(0, 40))
            fields.append((name, value.replace(b"\r", b"").replace(b"\n", b"").replace(b"\x00", b"")))
        if self._rare():
            fields.reverse()
        try:
            small = sum(len(v) for _, v in fields) < 1024  # hpack's Huffman coder is slow on big values
            return self.encoder.encode(fields, huffman=small and bool(self.src.pick(0, 1)))
        except (hpack.HPACKError, ValueError, UnicodeError):
            return b""

    def _headers(self, stream_id: int, end_stream: bool) -> None:
        block = self._block()
        flags = END_STREAM if end_stream else 0
        pieces = self.src.pick(0, 12) if self.src.pick(0, 5) == 0 else 0
        if pieces == 0:
            self.out.append(frame(HEADERS, flags | END_HEADERS, stream_id, self._maybe_pad(block)))
            return
        cut = [self.src.pick(0, len(block)) for _ in range(pieces)]
        cut.sort()
        edges = [0, *cut, len(block)]
        parts = [block[a:b] for a, b in itertools.pairwise(edges)]
        self.out.append(frame(HEADERS, flags, stream_id, parts[0]))
        finish = not self._rare()
        for i, part in enumerate(parts[1:]):
            last = i == len(parts) - 2
            self.out.append(frame(CONTINUATION, END_HEADERS if last and finish else 0,
                                  stream_id + 2 if self._rare() else stream_id, part))

    def _maybe_pad(self, payload: bytes) -> bytes:
        return payload  # HEADERS padding is exercised through _padded on DATA

    def _padded(self, payload: bytes) -> tuple[int, bytes]:
        if self.src.pick(0, 5):
            return 0, payload
        pad = self.src.pick(0, 255)
        return PADDED, bytes([255 if self._rare() else pad]) + payload + b"\x00" * pad

    # -- actions
    def connect(self) -> None:
        stream_id = self.src.pick(0, 0x7FFFFFFF) if self._rare() else self.next_id
        self.next_id = max(self.next_id, stream_id + 2) if stream_id % 2 else self.next_id
        self.streams.append(stream_id)
        self._headers(stream_id, end_stream=self.src.pick(0, 15) == 0)

    def data(self) -> None:
        flags, payload = self._padded(self.src.blob(self._size(70000)))
        if self.src.pick(0, 3) == 0:
            flags |= END_STREAM
        self.out.append(frame(DATA, flags, self._stream(), payload))

    def reset(self) -> None:
        self.out.append(frame(RST_STREAM, 0, self._stream(), self.src.pick(0, 14).to_bytes(4, "big")))

    def window(self) -> None:
        increment = ([0, 1, self.src.pick(1, 1 << 20), 0x7FFFFFFF, self.src.pick(0, 0xFFFFFFFF)][self.src.pick(0, 4)]
                     if self._rare() else self.src.pick(1, 1 << 20))
        self.out.append(frame(WINDOW_UPDATE, 0, self._stream(), increment.to_bytes(4, "big")))

    def ping(self) -> None:
        size = self.src.pick(0, 16) if self._rare() else 8
        self.out.append(frame(PING, self.src.pick(0, 1), 1 if self._rare() else 0, self.src.blob(size)))

    def settings(self) -> None:
        if self.src.pick(0, 3) == 0:
            self.out.append(frame(SETTINGS, ACK, 0, b"" if self.src.pick(0, 3) else b"\x00" * 6))
            return
        body = b""
        valid = {1: (0, 1 << 16), 2: (0, 0), 3: (0, 1000), 4: (0, (1 << 31) - 1), 5: (1 << 14, (1 << 24) - 1),
                 6: (0, 1 << 20)}
        for _ in range(self.src.pick(0, 6)):
            if self._rare():
                ident = self.src.pick(0, 9)
                value = [0, 1, 16383, 16384, 1 << 24, (1 << 31) - 1, 1 << 31, self.src.pick(0, 0xFFFFFFFF)][
                    self.src.pick(0, 7)]
            else:
                ident = self.src.pick(1, 6)
                value = self.src.pick(*valid[ident])
            body += ident.to_bytes(2, "big") + value.to_bytes(4, "big")
        if self._rare():
            body += b"\x00" * self.src.pick(1, 5)
        self.out.append(frame(SETTINGS, 0, 1 if self._rare() else 0, body))

    def priority(self) -> None:
        stream_id = self._stream()
        depends = stream_id if self._rare() else self._stream()
        self.out.append(frame(PRIORITY, 0, stream_id, depends.to_bytes(4, "big") + bytes([self.src.pick(0, 255)])))

    def goaway(self) -> None:
        code = 0 if self.src.pick(0, 1) else self.src.pick(0, 14)
        body = self._stream().to_bytes(4, "big") + code.to_bytes(4, "big") + self.src.blob(self._size(100))
        self.out.append(frame(GOAWAY, 0, 0, body))

    def trailers(self) -> None:
        stream_id = self._stream()
        if self._rare():
            self._headers(stream_id, end_stream=True)
        else:
            block = self.encoder.encode([(b"x-trailer", self.src.blob(self.src.pick(0, 20)).hex().encode())])
            self.out.append(frame(HEADERS, END_HEADERS | END_STREAM, stream_id, block))

    def oddity(self) -> None:
        """A frame no client sends: PUSH_PROMISE, an orphan CONTINUATION, an unknown type, a frame whose length
        lies about its size (header only), or random bytes."""
        pick = self.src.pick(0, 5)
        if pick == 0:
            self.out.append(frame(PUSH_PROMISE, END_HEADERS, self._stream(), (2).to_bytes(4, "big") + self._block()))
        elif pick == 1:
            self.out.append(frame(CONTINUATION, END_HEADERS, self._stream(), self._block()))
        elif pick == 2:
            self.out.append(frame(self.src.pick(10, 255), self.src.pick(0, 255), self._stream(),
                                  self.src.blob(self._size(40000))))
        elif pick == 3:
            claimed = [1 << 14, 1 << 20, (1 << 20) + 1, (1 << 24) - 1][self.src.pick(0, 3)]
            self.out.append(claimed.to_bytes(3, "big") + bytes([self.src.pick(0, 9), 0]) + b"\x00\x00\x00\x01")
        elif pick == 4:
            self.out.append(self.src.blob(self.src.pick(0, 32)))
        else:
            self.out.append(frame(self.src.pick(0, 9), self.src.pick(0, 255), self._stream(),
                                  self.src.blob(self._size(64))))

    def rapid_reset(self) -> None:
        for _ in range(self._size(150)):
            stream_id = self.next_id
            self.next_id += 2
            self.out.append(frame(HEADERS, END_HEADERS, stream_id, literal_connect(self.authority)))
            self.out.append(frame(RST_STREAM, 0, stream_id, (8).to_bytes(4, "big")))

    def continuation_flood(self) -> None:
        stream_id = self.next_id
        self.next_id += 2
        self.out.append(frame(HEADERS, 0, stream_id, b"\x00" * self._size(16384)))
        size = self._size(1 << 20) if self.src.pick(0, 7) == 7 else self._size(4096)
        for _ in range(self.src.pick(1, 70)):
            self.out.append(frame(CONTINUATION, 0, stream_id, b"\x00" * size))

    def ping_flood(self) -> None:
        self.out.append(frame(PING, 0, 0, b"\x00" * 8) * self._size(3000))

    def session(self, steps: int) -> Iterator[bytes]:
        """The session, one action's bytes at a time (so that a consumer may stop once the connection
        ended): preface (rarely broken) and SETTINGS, then ``steps`` actions at most."""
        self.out = [self.src.blob(24) if self.wild and self.src.pick(0, 15) == 15 else PREFACE]
        if not self._rare():
            self.settings()
        common = [self.connect] * 6 + [self.data] * 8 + [self.reset, self.window, self.window, self.ping,
                                                          self.settings, self.priority, self.trailers]
        hostile = [self.goaway, self.oddity, self.oddity, self.rapid_reset, self.continuation_flood, self.ping_flood]
        for _ in range(self.src.pick(1, steps)):
            yield b"".join(self.out)
            self.out = []
            pool = hostile if self._rare() or self.src.pick(0, 11) == 11 else common
            pool[self.src.pick(0, len(pool) - 1)]()
        yield b"".join(self.out)


def reads(src: Source, data: bytes) -> list[bytes]:
    """``data`` as the server's reads see it: whole, or cut at arbitrary points."""
    out, pos = [], 0
    while pos < len(data):
        step = [len(data), src.pick(1, 65536), src.pick(1, 17000), src.pick(1, 100), src.pick(1, 9), 1][src.pick(0, 5)]
        out.append(data[pos:pos + step])
        pos += step
    return out
