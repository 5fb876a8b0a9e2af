"""Stand-ins for exercising the capture: a transparent relay (NOT the agent's proxy), an echo server, a client.

TransparentRelay does what the agent's proxies must do at the socket level: IP_TRANSPARENT listeners;
the accepted socket's getsockname() is the original destination; the upstream connection carries the
agent mark and is bound (IP_TRANSPARENT) to the client's address, so the destination sees the client pod.
Threads are started inside the target namespace, so all their sockets live there.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Self

from agent.capture import netns as netns_mod

IP_TRANSPARENT = 19
SO_MARK = 36


@dataclass(frozen=True)
class Accepted:
    """One connection a relay listener accepted."""

    listener_port: int
    peer: tuple[str, int]
    original_dst: tuple[str, int]
    upstream_ok: bool


def transparent_listener(port: int, host: str = "0.0.0.0", backlog: int = 256) -> socket.socket:
    """A TCP listener that may accept connections for non-local addresses (needs CAP_NET_ADMIN)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    s.bind((host, port))
    s.listen(backlog)
    return s


def _pump(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


class _Server:
    def __init__(self, ns: str | None) -> None:
        self.ns = ns
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._stopping = False

    def _spawn(self, target: object, *args: object) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        with self._lock:
            self._threads.append(t)
        t.start()

    def _track(self, s: socket.socket) -> None:
        with self._lock:
            self._socks.append(s)

    def stop(self) -> None:
        """Close every socket (listeners first) and wait briefly for the threads."""
        self._stopping = True
        with self._lock:
            socks, self._socks = list(self._socks), []
            threads = list(self._threads)
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        for t in threads:
            t.join(timeout=2)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class TransparentRelay(_Server):
    """Accept on IP_TRANSPARENT listeners in namespace `ns`, connect to the original destination with
    the client's IP (mark 0x539), relay both ways. `accepted` records what each listener saw."""

    def __init__(
        self, ns: str | None, ports: Iterable[int] = (15001, 15006, 15008), mark: int = 0x539,
        spoof_port: bool = False, connect_timeout: float = 3.0,
    ) -> None:  # fmt: skip
        super().__init__(ns)
        self.mark = mark
        self.spoof_port = spoof_port
        self.connect_timeout = connect_timeout
        self.accepted: list[Accepted] = []
        self.listeners: dict[int, socket.socket] = {}
        with netns_mod.entered(ns):
            for port in ports:
                s = transparent_listener(port)
                self.listeners[port] = s
                self._track(s)
                self._spawn(self._accept_loop, s, port)

    def _accept_loop(self, ls: socket.socket, port: int) -> None:
        while not self._stopping:
            try:
                conn, peer = ls.accept()
            except OSError:
                return
            self._track(conn)
            self._spawn(self._handle, conn, peer, port)

    def _handle(self, conn: socket.socket, peer: tuple[str, int], port: int) -> None:
        try:
            orig = conn.getsockname()
        except OSError:  # closed by stop() before this thread ran
            return
        up = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._track(up)
        ok = True
        try:
            up.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            up.setsockopt(socket.SOL_SOCKET, SO_MARK, self.mark)
            up.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            up.bind((peer[0], peer[1] if self.spoof_port else 0))
            up.settimeout(self.connect_timeout)
            up.connect(orig)
            up.settimeout(None)
        except OSError:
            ok = False
        with self._lock:
            self.accepted.append(Accepted(port, peer, orig, ok))
        if not ok:
            conn.close()
            up.close()
            return
        self._spawn(_pump, up, conn)
        _pump(conn, up)


class EchoServer(_Server):
    """Answers every connection with `peer=<ip>:<port> got=<bytes until EOF>` and closes.

    greet_only: answer `peer=<ip>:<port>` at once and close without reading (the server closes first,
    as HTTP/1.0 servers do)."""

    def __init__(
        self, ns: str | None, ports: Iterable[int] = (8080,), host: str = "0.0.0.0", greet_only: bool = False
    ) -> None:
        super().__init__(ns)
        self.greet_only = greet_only
        self.peers: list[tuple[str, int]] = []
        with netns_mod.entered(ns):
            for port in ports:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((host, port))
                s.listen(256)
                self._track(s)
                self._spawn(self._accept_loop, s)

    def _accept_loop(self, ls: socket.socket) -> None:
        while not self._stopping:
            try:
                conn, peer = ls.accept()
            except OSError:
                return
            with self._lock:
                self.peers.append(peer)
            self._spawn(self._handle, conn, peer)

    def _handle(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        with conn, contextlib.suppress(OSError):
            conn.settimeout(5)
            if self.greet_only:
                conn.sendall(f"peer={peer[0]}:{peer[1]}".encode())
                return
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
            conn.sendall(f"peer={peer[0]}:{peer[1]} got=".encode() + data)


def request(
    ns: str | None, ip: str, port: int, payload: bytes = b"hello", timeout: float = 2.0,
    source_port: int = 0,
) -> bytes:  # fmt: skip
    """Connect from namespace `ns`, send `payload`, half-close, return everything received."""
    return exchange(ns, ip, port, payload, timeout, source_port)[1]


def exchange(
    ns: str | None, ip: str, port: int, payload: bytes = b"hello", timeout: float = 2.0,
    source_port: int = 0,
) -> tuple[tuple[str, int], bytes]:  # fmt: skip
    """Like request(), also returning the client's own address (to tell a relayed connection from a
    direct one: a relay that does not keep the source port shows the server another port)."""
    with netns_mod.entered(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with s:
        if source_port:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("0.0.0.0", source_port))
        s.settimeout(timeout)
        s.connect((ip, port))
        local = s.getsockname()
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return local, out


def connect_time(ns: str | None, ip: str, port: int, timeout: float = 3.0, source_port: int = 0) -> float:
    """Seconds for one connect() from namespace `ns` (raises on failure)."""
    with netns_mod.entered(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with s:
        if source_port:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("0.0.0.0", source_port))
        s.settimeout(timeout)
        t0 = time.perf_counter()
        s.connect((ip, port))
        return time.perf_counter() - t0
