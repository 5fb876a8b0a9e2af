"""5,000 concurrent connections through one agent pair, byte-exact, and the memory each open connection costs
the agents (issue 11).

A pod on node 1 opens 1,000, then 5,000 connections to a pod on node 2 (HBONE between the agents), each
exchanging 64 unique bytes and staying open; the agents' RSS and PSS are read idle, at 1,000 and at 5,000
open connections, and the KiB per connection printed and bounded by ``BOUND_KIB`` at both counts: about 3x
the 7.0-7.6 KiB measured (RSS and PSS, both agents, both counts; ``python -m bench.conn_memory``, where the
Envoy pair's client and server take 15.6-15.9 and 22.3-22.7 KiB). The agents lift their open-files limit to
the hard limit themselves (each proxied connection holds a socket on each node).
"""

from __future__ import annotations

import os
import resource
import selectors
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from agent.capture import netns
from agent.lab.runtime import PodInfo
from bench.procs import Memory, memory
from tests.fixtures import lab_helpers as h
from tests.fixtures import lab_observe as lo
from tests.fixtures.eventually import eventually_sync

pytestmark = lo.lab_marks()

PORT = 9090
MESSAGE = 64
DEADLINE = 120.0  # for any phase
BOUND_KIB = 24.0  # per open connection, RSS and PSS, each agent


@contextmanager
def echo_server(pod: PodInfo) -> Iterator[None]:
    """One thread, a selector: every connection's bytes come back as they arrive."""
    with netns.entered(pod.netns):
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", PORT))
    listener.listen(4096)
    listener.setblocking(False)
    stop = threading.Event()
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)

    def serve() -> None:
        conns: list[socket.socket] = []
        while not stop.is_set():
            for key, _ in sel.select(0.1):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is listener:
                    for _ in range(1000):
                        try:
                            conn, _addr = listener.accept()
                        except BlockingIOError:
                            break
                        conn.setblocking(False)
                        sel.register(conn, selectors.EVENT_READ)
                        conns.append(conn)
                    continue
                try:
                    data = sock.recv(65536)
                except ConnectionError:
                    data = b""
                if data:
                    sock.sendall(data)  # 64 bytes: the send buffer always has room
                else:
                    sel.unregister(sock)
                    sock.close()
        for conn in conns:
            conn.close()

    thread = threading.Thread(target=serve, name="echo-many", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)
        sel.close()
        listener.close()


def open_connections(client: PodInfo, server: PodInfo, count: int) -> list[socket.socket]:
    """``count`` more connections, each having sent 64 unique bytes and read them back, left open."""
    socks: list[socket.socket] = []
    deadline = time.monotonic() + DEADLINE
    try:
        for i in range(count):
            assert time.monotonic() < deadline, f"only {i} of {count} connections in {DEADLINE:g}s"
            with netns.entered(client.netns):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.settimeout(30)
            s.connect((server.ip, PORT))
            payload = os.urandom(MESSAGE)
            s.sendall(payload)
            got = b""
            while len(got) < MESSAGE:
                chunk = s.recv(MESSAGE - len(got))
                assert chunk, f"connection {i} closed before its echo"
                got += chunk
            assert got == payload, f"connection {i}: the echo differs"
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


def per_connection_kib(now: Memory, idle: Memory, added: int) -> tuple[float, float]:
    """(RSS, PSS) KiB each of ``added`` connections costs."""
    return (now.rss - idle.rss) / 1024 / added, (now.pss - idle.pss) / 1024 / added


def mib(m: Memory) -> str:
    return f"{m.rss / (1 << 20):.0f} / {m.pss / (1 << 20):.0f}"


def test_five_thousand_connections_through_one_agent_pair() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # this process holds both ends: 10,000 sockets
    open_socks: list[socket.socket] = []
    try:
        with h.running_lab("many", nodes=2, pods=1, namespaces=("mesh",)) as (info, paths):
            client, server = info.pods
            h.set_namespace_label(paths, "mesh", "ambient")
            lo.wait_agents(paths, ["node-1", "node-2"], captured={"node-1": {client.ip}, "node-2": {server.ip}})
            agents = {node: h.agent_record(paths, node) for node in ("node-1", "node-2")}
            pids = {node: rec.pid for node, rec in agents.items() if rec is not None}
            with echo_server(server):
                open_socks += open_connections(client, server, 20)  # warm: pool, certificates, code paths
                idle = {node: memory(pid) for node, pid in pids.items()}
                open_socks += open_connections(client, server, 980)
                at_1000 = {node: memory(pid) for node, pid in pids.items()}
                open_socks += open_connections(client, server, 4000)
                at_5000 = {node: memory(pid) for node, pid in pids.items()}
                for node in pids:
                    assert lo.config_dump(paths, node)["connections"] >= 5000, node
                for node in pids:
                    per_1000 = per_connection_kib(at_1000[node], idle[node], 980)
                    per_5000 = per_connection_kib(at_5000[node], idle[node], 4980)
                    print(f"\n{node} agent: RSS / PSS {mib(idle[node])} MiB idle, {mib(at_1000[node])} MiB at "
                          f"1,000, {mib(at_5000[node])} MiB at 5,000 open connections: {per_1000[0]:.1f} / "
                          f"{per_1000[1]:.1f} KiB per connection at 1,000, {per_5000[0]:.1f} / {per_5000[1]:.1f} at "
                          "5,000")
                    for count, (rss, pss) in ((1000, per_1000), (5000, per_5000)):
                        assert rss < BOUND_KIB and pss < BOUND_KIB, \
                            f"{node} at {count:,}: {rss:.1f} KiB RSS, {pss:.1f} KiB PSS per open connection"
                for s in open_socks:
                    s.close()
                open_socks.clear()
                eventually_sync(lambda: all(lo.config_dump(paths, n)["connections"] == 0 for n in pids),
                                "every proxied connection closed on both agents", 30)
    finally:
        for s in open_socks:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
