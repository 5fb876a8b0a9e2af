"""Load endpoints of the benchmark, each run in its own process (``python -m bench.load ...``).

``receiver``  the TCP server behind every path. Each connection opens with a 13-byte header
              ``mode(1) tag(8) size(4, big-endian)``: mode ``B`` (bulk) reads until EOF and prints one JSON
              line ``{"tag", "bytes", "t_first", "t_eof"}`` (CLOCK_MONOTONIC seconds, comparable across
              processes on one machine); mode ``E`` (echo) answers every ``size``-byte request with ``size``
              bytes until EOF. Connections that close before a full header (readiness probes) are ignored.
``bulk``      sends ``--bytes`` bytes on one connection, then shuts down its write side and waits for the
              receiver to close; prints ``{"t_first_send", "bytes"}``.
``rr``        ``--count`` sequential exchanges of ``--size`` bytes each way on one TCP_NODELAY connection
              (after ``--warmup`` unmeasured ones); prints ``{"samples_ns": [...]}``.
``conn``      ``--count`` new connections, made by ``--clients`` threads at once (1: one after another),
              each: connect, send an echo header and ``--size`` bytes in one write, read the ``--size``-byte
              echo, shut down the write side, read the receiver's EOF, close (so the connection is over at
              both ends when the next one starts). Set-up latency per connection: from just before
              ``connect()`` to the arrival of the reply's first byte (``perf_counter_ns``), i.e. the TCP
              handshake with the first hop, the path's own set-up and one exchange. Prints
              ``{"setup_ns": [...], "seconds", "cpu_seconds", "failed", "errors"}``: wall time from the first
              connect to the last close, this process's CPU over that time, failed connections and the first
              few errors.

Throughput is measured at the receiver: bytes / (t_eof at the receiver - t_first_send at the sender).
Socket buffers are set to 4 MiB when the kernel allows it (net.core.[rw]mem_max); application reads and
writes are 1 MiB (sender) / 4 MiB (receiver) at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import socket
import struct
import sys
import threading
import time
from pathlib import Path

HEADER = struct.Struct("!c8sI")
BULK = b"B"
ECHO = b"E"
SOCK_BUF = 4 * 1024 * 1024
SEND_CHUNK = 1024 * 1024
RECV_CHUNK = 4 * 1024 * 1024
MAX_CONNECTIONS = 1_000_000  # bound of the receiver's accept loop
MAX_EXCHANGES = 100_000_000  # bound of one echo connection


def _sysctl_int(name: str) -> int:
    try:
        return int(Path("/proc/sys/" + name.replace(".", "/")).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def big_buffers(sock: socket.socket) -> None:
    """4 MiB socket buffers where net.core.[rw]mem_max allows; else leave the kernel's autotuning alone
    (a smaller fixed buffer would be worse than autotuning)."""
    if _sysctl_int("net.core.wmem_max") >= SOCK_BUF:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCK_BUF)
    if _sysctl_int("net.core.rmem_max") >= SOCK_BUF:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCK_BUF)


def _recv_exact(sock: socket.socket, view: memoryview) -> bool:
    got = 0
    want = len(view)
    while got < want:
        n = sock.recv_into(view[got:])
        if n == 0:
            return False
        got += n
    return True


def _serve_bulk(conn: socket.socket, tag: bytes, t_first: float) -> None:
    buf = bytearray(RECV_CHUNK)
    total = 0
    for _ in range(1 << 40):  # ends at EOF; bounded far beyond any transfer size
        n = conn.recv_into(buf)
        if n == 0:
            break
        total += n
    t_eof = time.monotonic()
    line = json.dumps({"tag": tag.hex(), "bytes": total, "t_first": t_first, "t_eof": t_eof})
    with _print_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def _serve_echo(conn: socket.socket, size: int) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(size)
    view = memoryview(buf)
    for _ in range(MAX_EXCHANGES):
        if not _recv_exact(conn, view):
            return
        conn.sendall(view)


_print_lock = threading.Lock()


def _handle(conn: socket.socket) -> None:
    with conn:
        try:
            header = bytearray(HEADER.size)
            # the first recv may carry payload behind the header: read the header exactly, then the rest
            if not _recv_exact(conn, memoryview(header)):
                return
            t_first = time.monotonic()
            mode, tag, size = HEADER.unpack(header)
            if mode == BULK:
                _serve_bulk(conn, tag, t_first)
            elif mode == ECHO and 0 < size <= 1 << 24:
                _serve_echo(conn, size)
        except OSError:
            return


class Workers:
    """Threads serving accepted connections. A thread is started only when none is idle (bulk and echo
    connections keep theirs for as long as they last), so short connections do not pay for a thread start
    each: with 50 clients making connections the receiver would otherwise start a thread per connection."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[socket.socket] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0  # workers waiting on the queue that no queued connection has claimed yet

    def submit(self, conn: socket.socket) -> None:
        with self._lock:
            start = self._idle == 0
            if not start:
                self._idle -= 1
        self._queue.put(conn)
        if start:
            threading.Thread(target=self._work, daemon=True).start()

    def idle(self) -> int:
        """Workers waiting for a connection."""
        with self._lock:
            return self._idle

    def _work(self) -> None:
        for _ in range(MAX_CONNECTIONS):
            _handle(self._queue.get())
            with self._lock:
                self._idle += 1


def run_receiver(host: str, port: int, max_seconds: float) -> None:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    big_buffers(srv)  # before listen(): accepted sockets inherit it, and the window scale is chosen
    srv.bind((host, port))
    srv.listen(128)
    srv.settimeout(1.0)
    h, p = srv.getsockname()
    print(f"listening on {h}:{p}", flush=True)
    deadline = time.monotonic() + max_seconds
    workers = Workers()
    for _ in range(MAX_CONNECTIONS):
        if time.monotonic() > deadline:
            break
        try:
            conn, _ = srv.accept()
        except TimeoutError:
            continue
        conn.settimeout(None)
        workers.submit(conn)


def _connect(addr: tuple[str, int], nodelay: bool) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    big_buffers(sock)
    if nodelay:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(30.0)
    sock.connect(addr)
    return sock


def run_bulk(addr: tuple[str, int], nbytes: int, tag: bytes, timeout: float) -> dict[str, float | int]:
    block = os.urandom(SEND_CHUNK)
    with _connect(addr, nodelay=False) as sock:
        sock.settimeout(timeout)
        header = HEADER.pack(BULK, tag, 0)
        first = min(nbytes, SEND_CHUNK - len(header))
        t_first_send = time.monotonic()
        sock.sendall(header + block[:first])
        sent = first
        view = memoryview(block)
        for _ in range(nbytes // SEND_CHUNK + 2):
            if sent >= nbytes:
                break
            n = min(SEND_CHUNK, nbytes - sent)
            sock.sendall(view[:n])
            sent += n
        sock.shutdown(socket.SHUT_WR)
        sock.recv(1)  # the receiver closes once it has seen EOF
    return {"t_first_send": t_first_send, "bytes": sent}


def run_rr(addr: tuple[str, int], count: int, size: int, warmup: int, timeout: float) -> dict[str, list[int]]:
    request = os.urandom(size)
    reply = bytearray(size)
    view = memoryview(reply)
    samples: list[int] = []
    with _connect(addr, nodelay=True) as sock:
        sock.settimeout(timeout)
        sock.sendall(HEADER.pack(ECHO, os.urandom(8), size))
        clock = time.perf_counter_ns
        for i in range(warmup + count):
            t0 = clock()
            sock.sendall(request)
            if not _recv_exact(sock, view):
                raise ConnectionError(f"echo connection closed after {i} exchanges")
            t1 = clock()
            if i >= warmup:
                samples.append(t1 - t0)
        if bytes(reply) != request:
            raise ConnectionError("echo reply differs from the request")
    return {"samples_ns": samples}


def _one_connection(addr: tuple[str, int], request: bytes, reply: memoryview, timeout: float) -> int:
    """One connection of the ``conn`` workload; its set-up latency in ns. The echo must match the request."""
    size = len(reply)
    t0 = time.perf_counter_ns()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.connect(addr)
        sock.sendall(request)
        got = sock.recv_into(reply)
        t1 = time.perf_counter_ns()
        if got == 0 or not _recv_exact(sock, reply[got:]):
            raise ConnectionError(f"connection closed after {got} of the {size}-byte echo")
        if reply != request[-size:]:
            raise ConnectionError("echo reply differs from the request")
        sock.shutdown(socket.SHUT_WR)
        if sock.recv(1) != b"":
            raise ConnectionError("the receiver sent more than the echo")
    return t1 - t0


def run_conn(addr: tuple[str, int], count: int, clients: int, size: int,
             timeout: float) -> dict[str, object]:
    """``count`` connections by ``clients`` threads (shares differ by at most one); see the module doc."""
    payload = os.urandom(size)
    request = HEADER.pack(ECHO, os.urandom(8), size) + payload
    shares = [count // clients + (i < count % clients) for i in range(clients)]
    setup: list[list[int]] = [[] for _ in shares]
    errors: list[str] = []
    failed = [0] * len(shares)
    lock = threading.Lock()
    start = threading.Barrier(len(shares) + 1)

    def client(i: int) -> None:
        reply = memoryview(bytearray(size))
        start.wait()
        for _ in range(shares[i]):
            try:
                setup[i].append(_one_connection(addr, request, reply, timeout))
            except OSError as e:
                failed[i] += 1
                with lock:
                    if len(errors) < 5:
                        errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(len(shares))]
    for t in threads:
        t.start()
    start.wait()
    t0, cpu0 = time.monotonic(), time.process_time()
    for t in threads:
        t.join()
    seconds, cpu = time.monotonic() - t0, time.process_time() - cpu0
    return {"setup_ns": [x for s in setup for x in s], "seconds": seconds, "cpu_seconds": cpu,
            "failed": sum(failed), "errors": errors}


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("receiver")
    r.add_argument("--listen", default="127.0.0.1:0", type=_hostport)
    r.add_argument("--max-seconds", type=float, default=6 * 3600)
    b = sub.add_parser("bulk")
    b.add_argument("--connect", required=True, type=_hostport)
    b.add_argument("--bytes", type=int, required=True)
    b.add_argument("--tag", required=True, help="16 hex digits, echoed by the receiver")
    b.add_argument("--timeout", type=float, default=600.0)
    q = sub.add_parser("rr")
    q.add_argument("--connect", required=True, type=_hostport)
    q.add_argument("--count", type=int, default=10_000)
    q.add_argument("--size", type=int, default=1024)
    q.add_argument("--warmup", type=int, default=200)
    q.add_argument("--timeout", type=float, default=30.0)
    c = sub.add_parser("conn")
    c.add_argument("--connect", required=True, type=_hostport)
    c.add_argument("--count", type=int, default=2000)
    c.add_argument("--clients", type=int, default=1)
    c.add_argument("--size", type=int, default=100)
    c.add_argument("--timeout", type=float, default=10.0, help="per socket operation")
    args = ap.parse_args(argv)
    if args.cmd == "receiver":
        run_receiver(args.listen[0], args.listen[1], args.max_seconds)
        return 0
    if args.cmd == "bulk":
        out: object = run_bulk(args.connect, args.bytes, bytes.fromhex(args.tag), args.timeout)
    elif args.cmd == "rr":
        out = run_rr(args.connect, args.count, args.size, args.warmup, args.timeout)
    else:
        out = run_conn(args.connect, args.count, args.clients, args.size, args.timeout)
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
