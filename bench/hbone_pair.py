"""The tunnel library's CPU per new connection, both sides in one process: ``python -m bench.hbone_pair``.

A ``Forwarder`` and an ``HboneServer`` (real mutual TLS on loopback, uvloop) run in this process; an echo
upstream and a client run in subprocesses, so that this process's CPU (getrusage) is the tunnel's alone: the
client's outbound half (accept, pooled CONNECT, relay) plus the server's inbound half (request, upstream
connect, relay). The client makes ``--count`` sequential connections: connect, ``--size`` bytes, half-close,
read the echo to EOF, close. Each of ``--rounds`` rounds prints connections/s and user and system CPU per
connection; the median of the rounds ends the report.

glibc's allocator is set first as ``python -m hbone`` and the agent set it (``hbone.keep_buffers_on_heap``): left
to glibc's own thresholds, whether a large transient buffer costs mmap/munmap or brk system calls on every use
depends on the process's allocation history, and the figures with it (the tunnel's old 256 KiB TLS read buffers
cost this harness 15 system calls a connection that the lab's processes did not pay).

``--profile N`` runs cProfile (on a CPU clock, so waits do not count) over the last round and prints the top ``N``
functions by own time (or ``--sort``), what ``--callees`` call and what calls ``--callers``, and the Python calls
per connection.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import resource
import socket
import statistics
import subprocess
import sys
import threading
import time

from bench.paths import MeshCerts
from hbone.authority import Authority
from hbone.forward import Forwarder
from hbone.memory import keep_buffers_on_heap
from hbone.pool import Pool
from hbone.server import HboneServer, fixed_certificate

LOOPBACK = "127.0.0.1"


def echo_main() -> None:
    """The upstream: echo each connection until its EOF, one thread per connection. Prints its port."""
    server = socket.create_server((LOOPBACK, 0), backlog=1024)
    print(server.getsockname()[1], flush=True)

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    while True:
        conn, _ = server.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def client_main(port: int, count: int, size: int) -> None:
    """``count`` sequential connections to ``port``; prints connections/s. Any short echo is an error."""
    payload = b"x" * size
    started = time.perf_counter()
    for i in range(count):
        with socket.create_connection((LOOPBACK, port), timeout=10) as conn:
            conn.sendall(payload)
            conn.shutdown(socket.SHUT_WR)
            got = b""
            while data := conn.recv(65536):
                got += data
            if got != payload:
                raise SystemExit(f"connection {i}: echoed {len(got)} bytes, not the {size} sent")
    print(f"{count / (time.perf_counter() - started):.0f}", flush=True)


def _cpu() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


async def _pair(args: argparse.Namespace, upstream: Authority) -> list[tuple[float, float]]:
    certs = MeshCerts.create()
    server = HboneServer(fixed_certificate(certs.server), certs.bundle)
    await server.start(LOOPBACK, 0)
    pool = Pool(certs.bundle)
    forwarder = Forwarder(pool, certs.client, certs.server.identity, server.address, upstream)
    entry = await forwarder.start(LOOPBACK)
    profile = cProfile.Profile(time.process_time) if args.profile else None
    rounds: list[tuple[float, float]] = []
    try:
        for rnd in range(args.rounds):
            last = rnd == args.rounds - 1
            client = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.hbone_pair", "client", str(entry[1]), str(args.count), str(args.size),
                stdout=subprocess.PIPE)
            if profile is not None and last:
                profile.enable()
            user0, sys0 = _cpu()
            out, _ = await client.communicate()
            user1, sys1 = _cpu()
            if profile is not None and last:
                profile.disable()
            if client.returncode:
                raise SystemExit(f"client failed (exit {client.returncode})")
            user, system = (user1 - user0) / args.count * 1e6, (sys1 - sys0) / args.count * 1e6
            rounds.append((user, system))
            print(f"round {rnd}: {out.decode().strip()} conn/s, user {user:.1f} us, sys {system:.1f} us,"
                  f" total {user + system:.1f} us per connection (both sides)", flush=True)
    finally:
        await forwarder.close()
        await pool.close()
        await server.close()
    if profile is not None:
        stats = pstats.Stats(profile)
        stats.sort_stats(args.sort).print_stats(args.profile)
        if args.callees:
            stats.print_callees(args.callees)
        if args.callers:
            stats.print_callers(args.callers)
        calls = sum(s[1] for s in stats.stats.values())  # type: ignore[attr-defined]
        print(f"Python-level calls per connection (both sides): {calls / args.count:.0f}")
    return rounds


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["echo"]:
        echo_main()
        return
    if argv[:1] == ["client"]:
        client_main(int(argv[1]), int(argv[2]), int(argv[3]))
        return
    parser = argparse.ArgumentParser(prog="python -m bench.hbone_pair", description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=3000, help="connections per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", type=int, default=100, help="bytes sent and echoed per connection")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="cProfile the last round, print the top N functions")
    parser.add_argument("--sort", default="tottime", help="what the profile is sorted by (pstats keys: ncalls ...)")
    parser.add_argument("--callees", default="", metavar="REGEX", help="with --profile: also what these functions call")
    parser.add_argument("--callers", default="", metavar="REGEX", help="with --profile: also what calls these")
    args = parser.parse_args(argv)
    import uvloop

    keep_buffers_on_heap()

    echo = subprocess.Popen([sys.executable, "-m", "bench.hbone_pair", "echo"], stdout=subprocess.PIPE, text=True)
    try:
        assert echo.stdout is not None
        rounds = uvloop.run(_pair(args, Authority(LOOPBACK, int(echo.stdout.readline()))))
    finally:
        echo.kill()
        echo.wait()
    user = statistics.median(r[0] for r in rounds)
    system = statistics.median(r[1] for r in rounds)
    total = statistics.median(r[0] + r[1] for r in rounds)
    print(f"median of {len(rounds)} rounds: user {user:.1f} us, sys {system:.1f} us, total {total:.1f} us per"
          " connection (both sides)")


if __name__ == "__main__":
    main()
