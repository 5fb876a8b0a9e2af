"""Socket helpers shared by the HBONE library and the proxies built on it: dialling (with a mark and a
transparent source address), the two ends of an accepted connection, and closing with a reset. Both IP
families: a socket's family follows the address it connects to."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import struct

from hbone.addresses import Address, canonical_address

IP_BIND_ADDRESS_NO_PORT = 24  # <linux/in.h>; SOL_IP, and it applies to AF_INET6 sockets as well
IP_TRANSPARENT = 19  # linux/in.h; the socket module does not export it
IPV6_TRANSPARENT = 75  # linux/in6.h; the same socket flag as IP_TRANSPARENT, set at the IPv6 level
_LINGER_RESET = struct.pack("ii", 1, 0)


async def dial(address: Address, source_ip: str | None = None, *, mark: int | None = None,
               transparent: bool = False) -> socket.socket:
    """Connect to ``address``, from ``source_ip`` if given (of the same family: OSError EAFNOSUPPORT otherwise).
    ``transparent`` lets that be any address (a proxy speaking for its client, IP_TRANSPARENT or
    IPV6_TRANSPARENT); ``mark`` sets SO_MARK for policy routing."""
    v6 = ":" in address[0]
    if source_ip is not None and (":" in source_ip) != v6:
        raise OSError(errno.EAFNOSUPPORT, f"cannot dial {address[0]} from {source_ip}: not the same IP family")
    sock = FixedKindSocket.of(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_STREAM, nonblocking=True)
    try:
        if mark is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        if source_ip is not None:
            if transparent:
                set_transparent(sock)
            # The port is chosen at connect() for the whole 4-tuple, not at bind() for the address alone: a
            # proxy dialling from its clients' few addresses would otherwise search an ever fuller port range
            # (every TIME_WAIT holds its port) in the kernel on each new connection.
            sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source_ip, 0))
        await connect(sock, address)
    except BaseException:
        sock.close()
        raise
    return sock


class FixedKindSocket(socket.socket):
    """A socket whose ``family`` and ``type`` are stored once: ``socket.socket`` makes an IntEnum of them in Python on
    every read, and uvloop's ``connect_accepted_socket`` reads them three times (~2 us per socket)."""

    __slots__ = ("family", "type")
    family: socket.AddressFamily  # stored, over the base class's property
    type: socket.SocketKind

    @classmethod
    def of(cls, family: socket.AddressFamily, kind: socket.SocketKind, proto: int = 0,
           fileno: int | None = None, *, nonblocking: bool = False) -> FixedKindSocket:
        """A new socket (or one for ``fileno``, an accepted connection) of this ``family`` and ``kind``;
        ``nonblocking``: a new one made so (SOCK_NONBLOCK: no fcntl or ioctl afterwards)."""
        sock = cls(family, kind | socket.SOCK_NONBLOCK if nonblocking else kind, proto, fileno)
        sock.family, sock.type = family, kind
        return sock


async def connect(sock: socket.socket, address: Address) -> None:
    """Connect the non-blocking ``sock`` to ``address`` (an IP literal and a port): connect(), then a wait on
    the event loop for the socket to turn writable. Not ``loop.sock_connect``: uvloop's resolves even an IP
    literal with getaddrinfo on its thread pool, a hop to another thread and back (and ~45 us of CPU) on
    every connection.

    No wait when the handshake is over by the time connect() returns: towards a pod of this node, through its
    veth, the kernel runs the SYN, the SYN-ACK and the ACK within the call. The socket is then never added to the
    event loop and taken off again (two epoll_ctl calls, a future, a task switch): whoever makes a transport of it
    adds it once."""
    err = sock.connect_ex(address)
    if err in (errno.EINPROGRESS, errno.EINTR):
        if _established(sock):
            return
        loop = asyncio.get_running_loop()
        writable = loop.create_future()
        fd = sock.fileno()
        loop.add_writer(fd, _set_done, writable)
        try:
            await writable
        finally:
            loop.remove_writer(fd)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, f"connect to {address[0]} port {address[1]}: {os.strerror(err)}")


def _established(sock: socket.socket) -> bool:
    """Whether a connecting TCP socket has its peer already: getpeername() fails (ENOTCONN) until the handshake is
    over, and on a connection refused or reset meanwhile (whose error SO_ERROR then says, once writable)."""
    try:
        sock.getpeername()
    except OSError:
        return False
    return True


def _set_done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def listener(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A TCP listener on ``host:port``, of the family of ``host`` (an IPv6 one for ``[::]`` and ``::1``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=1024, reuse_port=reuse_port)


def set_transparent(sock: socket.socket) -> None:
    """Let ``sock`` bind (and accept for) addresses that are not the host's: IP_TRANSPARENT, or IPV6_TRANSPARENT
    on an AF_INET6 socket (the kernel keeps one flag for both: a dual-stack socket is transparent for IPv4 too)."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
    else:
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)


def accepted_addresses(sock: socket.socket) -> tuple[Address, Address] | None:
    """(peer, local) of an accepted socket, the local address being the original destination of a
    transparently accepted connection; None, with the socket closed, if the connection is gone already.
    IPs are canonical: an IPv4 connection accepted by a dual-stack listener reads as IPv4."""
    try:
        peer, local = sock.getpeername(), sock.getsockname()
    except OSError:
        sock.close()
        return None
    return canonical_address(peer), canonical_address(local)


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
