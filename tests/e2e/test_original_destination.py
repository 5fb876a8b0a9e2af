"""The original destination of a DNATed connection from the node's conntrack table (issue 16): a client namespace
calls a Service VIP, the node namespace DNATs it with a real nftables rule (as kube-proxy does) to an address of
its own where a server accepts it; the lookup by the accepted socket's reply tuple gives the VIP:port back. A
connection that was not NATed gives None. IPv4 (through a dual-stack listener: IPv4-mapped addresses) and IPv6."""

from __future__ import annotations

import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from agent.capture import netns
from agent.capture.ctnetlink import Conntrack

pytestmark = pytest.mark.skipif(shutil.which("nft") is None, reason="needs nft")

NODE_V4, CLIENT_V4, VIP_V4 = "10.77.0.1", "10.77.0.2", "10.96.77.10"
NODE_V6, CLIENT_V6, VIP_V6 = "fd00:77::1", "fd00:77::2", "fd00:96:77::10"
SERVICE_PORT, TARGET_PORT = 80, 8080
RULES = f"""
table inet svc {{
  chain pre {{
    type nat hook prerouting priority dstnat; policy accept;
    ip daddr {VIP_V4} tcp dport {SERVICE_PORT} dnat ip to {NODE_V4}:{TARGET_PORT}
    ip6 daddr {VIP_V6} tcp dport {SERVICE_PORT} dnat ip6 to [{NODE_V6}]:{TARGET_PORT}
  }}
}}
"""


@dataclass(frozen=True)
class Net:
    node: str
    client: str


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, timeout=10)


@pytest.fixture
def net() -> Iterator[Net]:
    """Two namespaces of unique names joined by a veth; the node DNATs the VIPs to its own address. Removed
    (with their conntrack tables and nft rules) whatever happens."""
    tag = secrets.token_hex(3)
    made = Net(f"ctnat-node-{tag}", f"ctnat-client-{tag}")
    try:
        for ns in (made.node, made.client):
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", made.node, "link", "add", "n0", "type", "veth", "peer", "name", "c0", "netns", made.client)
        for ns, dev, v4, v6 in ((made.node, "n0", NODE_V4, NODE_V6), (made.client, "c0", CLIENT_V4, CLIENT_V6)):
            _ip("-n", ns, "addr", "add", f"{v4}/24", "dev", dev)
            _ip("-n", ns, "addr", "add", f"{v6}/64", "dev", dev, "nodad")
            _ip("-n", ns, "link", "set", dev, "up")
        _ip("-n", made.client, "route", "add", f"{VIP_V4}/32", "via", NODE_V4)
        _ip("-n", made.client, "-6", "route", "add", f"{VIP_V6}/128", "via", NODE_V6)
        netns.run(made.node, ["nft", "-f", "-"], input=RULES)
        yield made
    finally:
        for ns in (made.client, made.node):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True, timeout=10)
    assert not [n for n in netns.list_netns() if tag in n]


def _connect(net: Net, server: socket.socket, family: int, dst: str, port: int) -> tuple[socket.socket, socket.socket]:
    """A real TCP connection from the client namespace; (client socket, the server's accepted socket)."""
    with netns.entered(net.client):
        client = socket.socket(family, socket.SOCK_STREAM)
    client.settimeout(5)
    client.connect((dst, port))
    server.settimeout(5)
    accepted, _ = server.accept()
    client.sendall(b"ping")
    assert accepted.recv(4) == b"ping"
    return client, accepted


@pytest.fixture
def server(net: Net) -> Iterator[socket.socket]:
    """A dual-stack listener on the node's target port, as the agent's are (IPv4 peers appear IPv4-mapped)."""
    with netns.entered(net.node):
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", TARGET_PORT))
    sock.listen(8)
    yield sock
    sock.close()


@pytest.mark.parametrize(("family", "vip", "node_ip"), [(socket.AF_INET, VIP_V4, NODE_V4),
                                                         (socket.AF_INET6, VIP_V6, NODE_V6)])
def test_a_dnat_connection_gives_its_service_address_and_a_direct_one_none(
        net: Net, server: socket.socket, family: int, vip: str, node_ip: str) -> None:
    with netns.entered(net.node):
        ct = Conntrack()
    with ct:
        client, accepted = _connect(net, server, family, vip, SERVICE_PORT)
        with client, accepted:
            local, peer = accepted.getsockname()[:2], accepted.getpeername()[:2]
            if family == socket.AF_INET:
                assert local[0] == f"::ffff:{node_ip}"  # what the agent's dual-stack listener sees
            assert ct.original_destination(local, peer) == (vip, SERVICE_PORT)

            direct, accepted_direct = _connect(net, server, family, node_ip, TARGET_PORT)
            with direct, accepted_direct:
                local_d, peer_d = accepted_direct.getsockname()[:2], accepted_direct.getpeername()[:2]
                assert ct.entry_by_reply(local_d, peer_d) is not None  # tracked, but not rewritten
                assert ct.original_destination(local_d, peer_d) is None
            # a tuple the table does not hold (a connection NATed on another node, say)
            assert ct.original_destination(local, (peer[0], 1 if peer[1] != 1 else 2)) is None

            rounds = 2000
            start = time.perf_counter()
            for _ in range(rounds):
                ct.original_destination(local, peer)
            per_call_us = (time.perf_counter() - start) / rounds * 1e6
            print(f"\nconntrack original_destination ({'IPv4' if family == socket.AF_INET else 'IPv6'}): "
                  f"{per_call_us:.1f} us per lookup")
            assert per_call_us < 2000  # a bound that only a hang or a per-call timeout would break


def test_the_lookup_in_a_namespace_without_the_entry_is_none(net: Net, server: socket.socket) -> None:
    """The client's namespace never NATed anything: the same tuple there has no entry."""
    client, accepted = _connect(net, server, socket.AF_INET, VIP_V4, SERVICE_PORT)
    with client, accepted:
        with netns.entered(net.client):
            ct = Conntrack()
        with ct:
            assert ct.original_destination(accepted.getsockname()[:2], accepted.getpeername()[:2]) is None
