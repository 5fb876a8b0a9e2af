"""A TCP target for tunnel tests: full-duplex, byte-exact, with half-close checked in both directions.

Per connection the target sends ``down`` while it reads until EOF, then closes. The client sends ``up``
while it reads, and shuts down its write side when done; it sees EOF only once the target closed. Each
side therefore sees the other's FIN only if the tunnel carried it (HTTP/2 END_STREAM), and each checks
every byte it got. The client's FIN always comes first (see DuplexTarget._serve for why).
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import threading
import time
from dataclasses import dataclass, field

MAX_ACCEPTS = 64
CHUNK = 256 * 1024


def _send_all(sock: socket.socket, data: bytes, errors: list[BaseException], fin: bool) -> None:
    try:
        view = memoryview(data)
        for off in range(0, len(data), CHUNK):
            sock.sendall(view[off:off + CHUNK])
        if fin:
            sock.shutdown(socket.SHUT_WR)
    except OSError as e:
        errors.append(e)


def _read_to_eof(sock: socket.socket, limit: int) -> bytes:
    buf = bytearray()
    for _ in range(limit // 1024 + 1024):  # bounded: at least 1 KiB per recv until the limit
        chunk = sock.recv(CHUNK)
        if not chunk:
            return bytes(buf)
        buf += chunk
        if len(buf) > limit:
            raise AssertionError(f"received more than {limit} bytes")
    raise AssertionError("too many reads")


@dataclass
class DuplexTarget:
    """The server side; ``received`` holds what each connection delivered up to its EOF."""

    down: bytes
    timeout: float = 15.0
    received: list[bytes] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    accepted: int = 0

    def __post_init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.addr: tuple[str, int] = self._sock.getsockname()[:2]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept_loop, name="target-accept", daemon=True)
        self._acceptor.start()

    @property
    def authority(self) -> str:
        return f"{self.addr[0]}:{self.addr[1]}"

    def _accept_loop(self) -> None:
        deadline = time.monotonic() + 120
        while not self._stop.is_set() and self.accepted < MAX_ACCEPTS and time.monotonic() < deadline:
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(self.timeout)
            sender = threading.Thread(target=_send_all, args=(conn, self.down, self.errors, False),
                                      daemon=True)
            sender.start()
            try:
                self.received.append(_read_to_eof(conn, 1 << 30))
            except (OSError, AssertionError) as e:
                self.errors.append(e)
            sender.join(self.timeout)
            # FIN only now, after the client's FIN: Envoy's HBONE server cannot relay a half-close that
            # starts at the target (its TCP upstream resets the CONNECT stream, see bench/envoy.py)
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_WR)

    def wait_received(self, n: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.received) + len(self.errors) < n and time.monotonic() < deadline:
            time.sleep(0.01)

    def close(self) -> None:
        self._stop.set()
        self._sock.close()
        self._acceptor.join(2)
        for t in self._threads:
            t.join(2)


def exchange(entry: tuple[str, int], up: bytes, down_len: int, timeout: float = 15.0) -> bytes:
    """Connect to ``entry``, send ``up`` then FIN while reading to EOF; returns what came back."""
    errors: list[BaseException] = []
    with socket.create_connection(entry, timeout=timeout) as sock:
        sender = threading.Thread(target=_send_all, args=(sock, up, errors, True), daemon=True)
        sender.start()
        got = _read_to_eof(sock, down_len)
        sender.join(timeout)
    if errors:
        raise errors[0]
    return got


def refused(entry: tuple[str, int], timeout: float = 10.0) -> bool:
    """True when a connection to ``entry`` ends (EOF or reset) without a single byte coming back."""
    try:
        with socket.create_connection(entry, timeout=timeout) as sock:
            try:
                sock.sendall(b"hello, are you the right peer?")
            except OSError:
                return True
            return sock.recv(1024) == b""
    except ConnectionError:
        return True


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
