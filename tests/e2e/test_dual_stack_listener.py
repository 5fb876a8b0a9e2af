"""The agent's listeners and dials for both families (root: IP_TRANSPARENT, IPV6_TRANSPARENT and SO_MARK need
CAP_NET_ADMIN). Loopback only, in a network namespace the test makes."""

from __future__ import annotations

import asyncio
import secrets
import socket
import subprocess
from collections.abc import Iterator

import pytest

from agent.capture import netns
from agent.mesh.ports import AGENT_MARK
from agent.proxy.sockets import dial, transparent_listener
from hbone import accepted_addresses
from hbone.sockets import IP_BIND_ADDRESS_NO_PORT, IP_TRANSPARENT, IPV6_TRANSPARENT


@pytest.fixture
def own_netns() -> Iterator[str]:
    name = f"ambit-ds-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        netns.run(name, ["ip", "link", "set", "lo", "up"])
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=10)


def test_one_transparent_listener_takes_both_families_and_reads_ipv4_as_ipv4(own_netns: str) -> None:
    with netns.entered(own_netns):
        listener = transparent_listener(0)
        clients = [socket.socket(socket.AF_INET), socket.socket(socket.AF_INET6)]
    with listener, clients[0], clients[1]:
        assert listener.family == socket.AF_INET6 and listener.getsockname()[0] == "::"
        assert listener.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
        assert listener.getsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT) == 1
        assert listener.getsockopt(socket.SOL_IP, IP_TRANSPARENT) == 1  # one flag: IPv4 connections too
        port = listener.getsockname()[1]
        listener.setblocking(True)
        listener.settimeout(5)
        seen = []
        for client, host in zip(clients, ("127.0.0.1", "::1"), strict=True):
            client.settimeout(5)
            client.connect((host, port))
            conn, _ = listener.accept()
            ends = accepted_addresses(conn)
            conn.close()
            seen.append((ends, client.getsockname()[:2]))
        (v4, v4_client), (v6, v6_client) = seen
        assert v4 == ((v4_client[0], v4_client[1]), ("127.0.0.1", port))  # not ::ffff:127.0.0.1
        assert v6 == ((v6_client[0], v6_client[1]), ("::1", port))


def test_an_ipv4_host_keeps_an_ipv4_listener(own_netns: str) -> None:
    with netns.entered(own_netns):
        listener = transparent_listener(0, "127.0.0.1")
    with listener:
        assert listener.family == socket.AF_INET and listener.getsockopt(socket.SOL_IP, IP_TRANSPARENT) == 1


def test_an_ipv6_upstream_dial_is_transparent_marked_and_port_free_until_connect(own_netns: str) -> None:
    async def run() -> None:
        server = await asyncio.start_server(lambda _r, w: w.close(), "::1", 0)
        target = server.sockets[0].getsockname()[:2]
        try:
            # Checked while the server listens: a dial over loopback returns as connect() does (the handshake is
            # over by then), before the server accepts; closing the listener would reset the connection.
            with await dial(target, "::1") as sock:
                assert sock.family == socket.AF_INET6 and sock.getpeername()[:2] == target
                assert sock.getsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT) == 1
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == AGENT_MARK
                assert sock.getsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT) == 1
        finally:
            server.close()

    with netns.entered(own_netns):
        asyncio.run(run())
