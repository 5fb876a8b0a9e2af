"""Threaded TCP servers inside a network namespace, for the capture probes and the lab tests.

A server listens on its ports in namespace ``ns`` (None: this process's) and serves each accepted connection on
a thread of its own, started inside that namespace, so that sockets a handler makes (a relay's upstream) live
there too. Everything is bounded: the listeners poll for ``close()`` every 0.2 s, connection sockets have
``io_timeout``, and ``close()`` shuts every socket down and joins every thread, failing loudly if one hangs.
Subclasses say what a connection gets (``serve``); the echo servers and the relay are such subclasses.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterable
from typing import Self

from agent.capture import netns
from agent.capture.maps import canonical
from agent.mesh.model import Address

ACCEPT_POLL = 0.2  # seconds between looks at the stop flag while no connection comes
JOIN_GRACE = 5.0  # beyond io_timeout, for a thread to end once its sockets are shut down


class ThreadedServer:
    """TCP listeners on ``ports`` in namespace ``ns``, each connection served by ``serve`` on its own thread;
    ``peers`` lists every accepted connection's peer. ``io_timeout`` bounds each socket operation of a
    connection (None: no bound, for relays of connections that may sit idle; ``close()`` still ends them).
    ``listeners`` maps each port to its listening socket once started. ``host`` "::" listens on both families
    (IPv4 peers read as IPv4, not IPv4-mapped)."""

    def __init__(self, ns: str | None, ports: Iterable[int], *, host: str = "0.0.0.0",
                 io_timeout: float | None = 20.0) -> None:
        self.ns, self.ports, self.host, self.io_timeout = ns, tuple(ports), host, io_timeout
        self.peers: list[Address] = []
        self.listeners: dict[int, socket.socket] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._socks: set[socket.socket] = set()  # listeners, accepted connections and what handlers track
        self._threads: list[threading.Thread] = []

    def serve(self, conn: socket.socket, peer: Address, port: int) -> None:
        """Serve one connection accepted on ``port``; it is closed when this returns or raises OSError."""
        raise NotImplementedError

    def listener(self, port: int) -> socket.socket:
        """The listening socket for ``port``, made inside the namespace (SO_REUSEADDR, as create_server sets it),
        of the family of ``host`` (``::`` takes both families)."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        return socket.create_server((self.host, port), family=family, backlog=256, dualstack_ipv6=self.host == "::")

    def start(self) -> Self:
        with netns.entered(self.ns):
            for port in self.ports:
                sock = self.listener(port)
                sock.settimeout(ACCEPT_POLL)
                self.listeners[port] = sock
                self.track(sock)
                self.spawn(self._accept_loop, sock, port)
        return self

    def track(self, sock: socket.socket) -> None:
        """Have ``close()`` shut ``sock`` down too (a handler's own sockets)."""
        with self._lock:
            self._socks.add(sock)

    def untrack(self, sock: socket.socket) -> None:
        with self._lock:
            self._socks.discard(sock)

    def spawn(self, target: Callable[..., None], *args: object) -> threading.Thread:
        """Run ``target(*args)`` on a new thread, joined by ``close()``."""
        thread = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()
        return thread

    def _accept_loop(self, listener: socket.socket, port: int) -> None:
        while not self._stop.is_set():
            try:
                conn, (ip, peer_port, *_) = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            ip = canonical(ip)
            with self._lock:
                self.peers.append((ip, peer_port))
            self.track(conn)
            self.spawn(self._serve_then_close, conn, (ip, peer_port), port)

    def _serve_then_close(self, conn: socket.socket, peer: Address, port: int) -> None:
        conn.settimeout(self.io_timeout)
        try:
            self.serve(conn, peer, port)
        except OSError:  # the peer went away, or close() shut the socket down
            pass
        finally:
            self.untrack(conn)
            conn.close()

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            socks, threads = list(self._socks), list(self._threads)
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join(timeout=(self.io_timeout or 0) + JOIN_GRACE)
        for sock in socks:
            sock.close()
        assert not any(t.is_alive() for t in threads), f"threads of the server in {self.ns} still running"

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
