"""The connection workload's load client against the real receiver process on loopback, its failures,
and the receiver's reuse of idle worker threads."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.harness import Receiver
from bench.load import ECHO, HEADER, Workers, run_conn
from bench.paths import Place
from tests.fixtures.eventually import eventually_sync


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[str, int]]:
    rx = Receiver(tmp_path, Place())
    try:
        yield rx.addr
    finally:
        rx.stop()


@pytest.mark.timeout(60)
def test_sequential_and_concurrent_connections(receiver: tuple[str, int]) -> None:
    seq = run_conn(receiver, 200, 1, 100, 5.0)
    assert seq["failed"] == 0 and seq["errors"] == []
    setup = seq["setup_ns"]
    assert isinstance(setup, list) and len(setup) == 200 and all(isinstance(x, int) and x > 0 for x in setup)
    assert 0 < float(str(seq["seconds"])) < 60 and float(str(seq["cpu_seconds"])) >= 0
    many = run_conn(receiver, 101, 20, 100, 5.0)  # shares of 6 and 5
    assert many["failed"] == 0 and len(many["setup_ns"]) == 101  # type: ignore[arg-type]


@pytest.mark.timeout(60)
def test_a_held_connection_does_not_stop_new_ones(receiver: tuple[str, int]) -> None:
    with socket.create_connection(receiver, timeout=5.0) as held:
        held.sendall(HEADER.pack(ECHO, b"12345678", 4) + b"ping")
        assert held.recv(4) == b"ping"  # its worker is busy with it until it closes
        out = run_conn(receiver, 50, 5, 100, 5.0)
        assert out["failed"] == 0 and len(out["setup_ns"]) == 50  # type: ignore[arg-type]
        held.sendall(b"pong")
        assert held.recv(4) == b"pong"


@pytest.mark.timeout(30)
def test_refused_connections_are_counted_with_their_errors() -> None:
    with socket.socket() as closed:  # bound, never listening: connections to it are refused
        closed.bind(("127.0.0.1", 0))
        out = run_conn(closed.getsockname(), 12, 3, 100, 5.0)
    assert out["failed"] == 12 and out["setup_ns"] == []
    errors = out["errors"]
    assert isinstance(errors, list) and 1 <= len(errors) <= 5
    assert all(e.startswith("ConnectionRefusedError") for e in errors)


@contextlib.contextmanager
def _server(reply: bytes) -> Iterator[tuple[str, int]]:
    """A server answering each connection's first read with ``reply``, then closing."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            with conn:
                conn.recv(4096)
                conn.sendall(reply)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield srv.getsockname()
    finally:
        stop.set()
        t.join(5.0)
        srv.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("reply", "error"), [(b"x" * 100, "echo reply differs from the request"),
                                              (b"x" * 10, "connection closed after 10 of the 100-byte echo")])
def test_a_wrong_or_short_echo_is_a_failure(reply: bytes, error: str) -> None:
    with _server(reply) as addr:
        out = run_conn(addr, 3, 1, 100, 5.0)
    assert out["failed"] == 3 and out["setup_ns"] == []
    assert out["errors"] == [f"ConnectionError: {error}"] * 3


def _tcp_pair(listener: socket.socket) -> tuple[socket.socket, socket.socket]:
    """(accepted, client) ends of a new TCP connection on loopback."""
    client = socket.create_connection(listener.getsockname(), timeout=5.0)
    accepted, _ = listener.accept()
    return accepted, client


def _echo_once(peer: socket.socket) -> None:
    peer.sendall(HEADER.pack(ECHO, b"abcdefgh", 3) + b"abc")
    assert peer.recv(3) == b"abc"


@pytest.mark.timeout(30)
def test_workers_reuse_an_idle_thread_and_start_one_when_none_is_idle() -> None:
    workers = Workers()
    base = threading.active_count()
    listener = socket.create_server(("127.0.0.1", 0))
    a, a_peer = _tcp_pair(listener)
    workers.submit(a)
    _echo_once(a_peer)
    a_peer.close()  # EOF: the connection ends and its worker waits for the next one
    eventually_sync(lambda: workers.idle() == 1, "the first worker idle")
    b, b_peer = _tcp_pair(listener)
    workers.submit(b)
    _echo_once(b_peer)
    assert threading.active_count() == base + 1  # served by the same thread
    c, c_peer = _tcp_pair(listener)
    workers.submit(c)  # b still holds the only worker: a second one starts
    _echo_once(c_peer)
    assert threading.active_count() == base + 2
    for peer in (b_peer, c_peer, listener):
        peer.close()
    eventually_sync(lambda: workers.idle() == 2, "both workers idle")
