"""Socket helpers shared by the HBONE library and the proxies built on it: dialling (with a mark and a
transparent source address), the two ends of an accepted connection, and closing with a reset."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

Address = tuple[str, int]

IP_BIND_ADDRESS_NO_PORT = 24  # <linux/in.h>
IP_TRANSPARENT = 19  # linux/in.h; the socket module does not export it
_LINGER_RESET = struct.pack("ii", 1, 0)


async def dial(address: Address, source_ip: str | None = None, *, mark: int | None = None,
               transparent: bool = False) -> socket.socket:
    """Connect to ``address``, from ``source_ip`` if given. ``transparent`` lets that be any address (a
    proxy speaking for its client, IP_TRANSPARENT); ``mark`` sets SO_MARK for policy routing."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if mark is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        if source_ip is not None:
            if transparent:
                sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            # The port is chosen at connect() for the whole 4-tuple, not at bind() for the address alone: a
            # proxy dialling from its clients' few addresses would otherwise search an ever fuller port range
            # (every TIME_WAIT holds its port) in the kernel on each new connection.
            sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source_ip, 0))
        await loop.sock_connect(sock, address)
    except BaseException:
        sock.close()
        raise
    return sock


def accepted_addresses(sock: socket.socket) -> tuple[Address, Address] | None:
    """(peer, local) of an accepted socket, the local address being the original destination of a
    transparently accepted connection; None, with the socket closed, if the connection is gone already."""
    try:
        peer, local = sock.getpeername(), sock.getsockname()
    except OSError:
        sock.close()
        return None
    return (peer[0], peer[1]), (local[0], local[1])


def linger_reset(sock: socket.socket) -> None:
    """Make closing ``sock`` send RST rather than FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)


def close_with_reset(sock: socket.socket) -> None:
    """Refuse or end a connection the way a denial or a failed upstream should: RST, not FIN."""
    linger_reset(sock)
    sock.close()


def abort_with_reset(transport: asyncio.BaseTransport) -> None:
    """Close a TCP transport with RST rather than FIN (how a reset crosses the tunnel)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        linger_reset(sock)
    transport.abort()  # type: ignore[attr-defined]
