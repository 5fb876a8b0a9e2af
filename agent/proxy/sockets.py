"""Sockets of a transparent proxy: listeners that accept connections addressed to other hosts, and
upstream connections that carry the client's own address.

Listeners are transparent (IP_TRANSPARENT, IPV6_TRANSPARENT): the eBPF programs hand them connections whose
destination is a pod, and the accepted socket's local address is that original destination. One listener per
port serves both IP families, as ztunnel's: an AF_INET6 socket on ``::`` that also takes IPv4 (IPV6_V6ONLY
off), whose IPv4 connections read as IPv4 (``hbone.accepted_addresses``); on a kernel without IPv6 it is an
AF_INET socket on 0.0.0.0. Either way one socket per port is what the capture programs look up and what
``Redirector.register_listener`` is given, for both families.

Every socket of the agent carries its mark (0x539), listeners (hence their SYN-ACKs and accepted sockets) and
upstream sockets alike, so the programs (an enrolled pod's door among them) and policy routing leave its
packets alone; upstream sockets, when they speak for a pod, are bound to the pod's IP (transparent again) so
the other end sees the client, not the node; the programs steer the replies back to the agent. An upstream
socket is of the family of its destination, and ``route`` only ever pairs a client with a destination of its
own family.
"""

from __future__ import annotations

import errno
import logging
import socket

from agent.mesh.ports import AGENT_MARK
from hbone import dial as hbone_dial
from hbone import set_transparent

log = logging.getLogger(__name__)

ANY = "::"  # the unspecified address of the dual-stack listeners


def transparent_listener(port: int, host: str = ANY, backlog: int = 1024) -> socket.socket:
    """A transparent listener on ``host:port``: dual-stack on ``::`` (the default), IPv4 only on an IPv4
    ``host``, or on a node without IPv6. SO_REUSEPORT: an upgrade starts the next agent on the same ports while
    this one drains; when this one closes its listeners, new connections find only the next agent's (and, with
    net.ipv4.tcp_migrate_req, those still queued on this one's move there too)."""
    v6 = ":" in host
    try:
        sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_STREAM)
    except OSError as e:
        if not v6 or e.errno != errno.EAFNOSUPPORT or host != ANY:
            raise
        log.warning("no IPv6 in this kernel: the listener on port %d takes IPv4 only", port)
        return transparent_listener(port, "0.0.0.0", backlog)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if v6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        set_transparent(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, AGENT_MARK)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def upstream_source(client: tuple[str, int], target: tuple[str, int]) -> str | None:
    """The source address of the agent's connection to a local pod on behalf of ``client``: the client's own
    (the pod sees who called), except when the client is that very pod (it called itself through a Service):
    the pod would answer its own address over its loopback, never to the agent, so the node's address is used,
    as kube-proxy masquerades such hairpin connections."""
    return None if client[0] == target[0] else client[0]


async def dial(address: tuple[str, int], source_ip: str | None) -> socket.socket:
    """Connect to ``address`` with the agent's mark, from ``source_ip`` (any address, spoofed) if given."""
    return await hbone_dial(address, source_ip, mark=AGENT_MARK, transparent=True)
