"""Stand-ins for exercising the capture: a transparent relay (NOT the agent's proxy), an echo server, a client.

TransparentRelay does what the agent's proxies must do at the socket level, for IPv4 and IPv6: transparent
listeners, one dual-stack socket per port on :: (IPV6_V6ONLY off), the shape of the agent's own; the accepted
socket's getsockname() is the original destination; the upstream connection, of the destination's family,
carries the agent mark and is bound (transparent) to the client's address, so the destination sees the client
pod. Both are ``bench.servers.ThreadedServer``s: their threads and sockets live in the target namespace.
Addresses are reported as ``agent.capture.maps.canonical`` spells them (IPv4 never as IPv4-mapped).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from agent.capture import netns as netns_mod
from agent.capture.maps import canonical
from agent.mesh.model import Address
from agent.mesh.ports import AGENT_MARK
from bench.servers import ThreadedServer

IPV6_TRANSPARENT = 75  # linux/in6.h; the socket module does not export it (IP_TRANSPARENT: 19)


def family_of(ip: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def make_transparent(sock: socket.socket) -> None:
    """Let `sock` bind, or accept for, an address that is not the namespace's own."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
    else:
        sock.setsockopt(socket.SOL_IP, socket.IP_TRANSPARENT, 1)


@dataclass(frozen=True)
class Accepted:
    """One connection a relay listener accepted."""

    listener_port: int
    peer: Address
    original_dst: Address
    upstream_ok: bool


def _pump(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


class TransparentRelay(ThreadedServer):
    """Accept on transparent dual-stack listeners in namespace `ns`, connect to the original destination with
    the client's IP (mark 0x539), relay both ways. `accepted` records what each listener saw."""

    def __init__(
        self, ns: str | None, ports: Iterable[int] = (15001, 15006, 15008), mark: int = AGENT_MARK,
        spoof_port: bool = False, connect_timeout: float = 3.0,
    ) -> None:  # fmt: skip
        super().__init__(ns, ports, host="::", io_timeout=None)  # relayed connections may sit idle
        self.mark = mark
        self.spoof_port = spoof_port
        self.connect_timeout = connect_timeout
        self.accepted: list[Accepted] = []

    def listener(self, port: int) -> socket.socket:
        """The agent's listener (``agent.proxy.sockets.transparent_listener``: transparent, SO_REUSEPORT, the
        agent's mark, which its SYN-ACKs carry past the doors) in the shape of branch ipv6's: one AF_INET6 socket
        on :: with IPV6_V6ONLY off, for both families."""
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.mark)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            make_transparent(sock)
            sock.bind((self.host, port))
            sock.listen(1024)
        except BaseException:
            sock.close()
            raise
        return sock

    def serve(self, conn: socket.socket, peer: Address, port: int) -> None:
        ip, orig_port = conn.getsockname()[:2]
        orig = (canonical(ip), orig_port)
        with socket.socket(family_of(orig[0]), socket.SOCK_STREAM) as up:
            self.track(up)
            ok = True
            try:
                make_transparent(up)
                up.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.mark)
                up.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                up.bind((peer[0], peer[1] if self.spoof_port else 0))
                up.settimeout(self.connect_timeout)
                up.connect(orig)
                up.settimeout(None)
            except OSError:
                ok = False
            with self._lock:
                self.accepted.append(Accepted(port, peer, orig, ok))
            if ok:
                back = self.spawn(_pump, up, conn)
                _pump(conn, up)
                back.join()
            self.untrack(up)


class EchoServer(ThreadedServer):
    """Answers every connection with `peer=<ip>:<port> got=<bytes until EOF>` and closes.

    greet_only: answer `peer=<ip>:<port>` at once and close without reading (the server closes first,
    as HTTP/1.0 servers do)."""

    def __init__(
        self, ns: str | None, ports: Iterable[int] = (8080,), host: str = "::", greet_only: bool = False
    ) -> None:
        super().__init__(ns, ports, host=host, io_timeout=5.0)
        self.greet_only = greet_only

    def serve(self, conn: socket.socket, peer: Address, port: int) -> None:
        if self.greet_only:
            conn.sendall(f"peer={peer[0]}:{peer[1]}".encode())
            return
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
        conn.sendall(f"peer={peer[0]}:{peer[1]} got=".encode() + data)


def _client(ns: str | None, family: socket.AddressFamily, timeout: float, source_port: int) -> socket.socket:
    """A TCP socket of `family` made in namespace `ns`, bound to `source_port` if given (0: any)."""
    with netns_mod.entered(ns):
        s = socket.socket(family, socket.SOCK_STREAM)
    try:
        if source_port:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", source_port))
        s.settimeout(timeout)
    except BaseException:
        s.close()
        raise
    return s


@contextlib.contextmanager
def private_bpffs() -> Iterator[str]:
    """A bpffs mounted on a temporary directory for the duration of the block (tcx pins of a test or an
    experiment; the machine's /sys/fs/bpf is left alone)."""
    d = tempfile.mkdtemp(prefix="ambit-bpffs-")
    subprocess.run(["mount", "-t", "bpf", "bpf", d], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", d], check=False)
        os.rmdir(d)


def request(
    ns: str | None, ip: str, port: int, payload: bytes = b"hello", timeout: float = 2.0,
    source_port: int = 0,
) -> bytes:  # fmt: skip
    """Connect from namespace `ns`, send `payload`, half-close, return everything received."""
    return exchange(ns, ip, port, payload, timeout, source_port)[1]


def exchange(
    ns: str | None, ip: str, port: int, payload: bytes = b"hello", timeout: float = 2.0,
    source_port: int = 0,
) -> tuple[tuple[str, int], bytes]:  # fmt: skip
    """Like request(), also returning the client's own address (to tell a relayed connection from a
    direct one: a relay that does not keep the source port shows the server another port)."""
    with _client(ns, family_of(ip), timeout, source_port) as s:
        s.connect((ip, port))
        local = s.getsockname()[:2]
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return local, out


def connect_time(ns: str | None, ip: str, port: int, timeout: float = 3.0, source_port: int = 0) -> float:
    """Seconds for one connect() from namespace `ns` (raises on failure)."""
    with _client(ns, family_of(ip), timeout, source_port) as s:
        t0 = time.perf_counter()
        s.connect((ip, port))
        return time.perf_counter() - t0
