"""Sockets of a transparent proxy: listeners that accept connections addressed to other hosts, and
upstream connections that carry the client's own address.

Listeners are IP_TRANSPARENT: the eBPF programs hand them connections whose destination is a pod, and
the accepted socket's local address is that original destination. Every socket of the agent carries its
mark (0x539), listeners (hence their SYN-ACKs and accepted sockets) and upstream sockets alike, so the
programs (an enrolled pod's door among them) and policy routing leave its packets alone; upstream sockets,
when they speak for a pod, are
bound to the pod's IP (IP_TRANSPARENT again) so the other end sees the client, not the node; the
programs steer the replies back to the agent.
"""

from __future__ import annotations

import socket

from agent.mesh.ports import AGENT_MARK
from hbone import IP_TRANSPARENT
from hbone import dial as hbone_dial


def transparent_listener(port: int, host: str = "0.0.0.0", backlog: int = 1024) -> socket.socket:
    """SO_REUSEPORT: an upgrade starts the next agent on the same ports while this one drains; when this one
    closes its listeners, new connections find only the next agent's (and, with net.ipv4.tcp_migrate_req,
    those still queued on this one's move there too)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, AGENT_MARK)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def dial(address: tuple[str, int], source_ip: str | None) -> socket.socket:
    """Connect to ``address`` with the agent's mark, from ``source_ip`` (any address, spoofed) if given."""
    return await hbone_dial(address, source_ip, mark=AGENT_MARK, transparent=True)
