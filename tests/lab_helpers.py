"""Helpers for end-to-end tests on an `ambit lab`: echo servers and clients inside pod namespaces, packet
captures on the lab's wire, and views of the nodes' kernel state (tc filters, ip rules, sockets).

Everything here is bounded: every socket has a timeout, every capture a packet limit and a wall-clock limit
(``timeout(1)`` around tcpdump, so even a killed test process leaves nothing running for long), every wait a
deadline. Traffic stays inside the lab's namespaces: sockets are created in a pod's namespace (``setns`` on
the calling thread; a socket stays in the namespace it was made in) and talk to pod addresses only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self, TypeVar

from agent.capture import netns
from agent.lab import control, hosts
from agent.lab import runtime as rt
from agent.lab import state as lab_state
from agent.lab.runtime import LabInfo, LabPaths, PodInfo, ProcRecord

T = TypeVar("T")

SERVER_PORT = 8080
HBONE_PORT = 15008
DATAPLANE_MODE = "istio.io/dataplane-mode"
IO_TIMEOUT = 20.0  # any single socket operation of a test client or server
MARKER_EVERY = 4096  # the marker is repeated this often in a payload, so a copy always lies within one segment


def tools_missing() -> list[str]:
    return [t for t in ("tcpdump", "tshark", "timeout", "ss", "tc", "ip") if shutil.which(t) is None]


def eventually(check: Callable[[], T | None], timeout: float, what: str, interval: float = 0.02) -> T:
    """Poll ``check`` until it returns something other than None/False; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result is not None and result is not False:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {timeout:g}s: {what}")
        time.sleep(interval)


# -- payloads ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Payload:
    """Random bytes with a random 32-byte marker every MARKER_EVERY bytes (none of the random filler can
    contain it by chance)."""

    data: bytes
    marker: bytes

    @classmethod
    def make(cls, size: int) -> Payload:
        marker = secrets.token_bytes(32)
        chunks = []
        for _ in range(0, size, MARKER_EVERY):
            chunks.append(marker + os.urandom(MARKER_EVERY - len(marker)))
        return cls(b"".join(chunks)[:size], marker)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


# -- echo server and client --------------------------------------------------------------------------------------
# Wire protocol (one TCP connection, any number of exchanges): the client sends an 8-byte big-endian length
# and that many bytes; the server answers one JSON line {"peer": [ip, port], "sha256": ..., "size": n} and then
# echoes the n bytes. Length 0 ends the connection.
def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def _recv_line(sock: socket.socket, limit: int = 4096) -> bytes:
    buf = bytearray()
    while not buf.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError(f"EOF in the answer line after {bytes(buf)!r}")
        buf += chunk
        if len(buf) > limit:
            raise ConnectionError("answer line too long")
    return bytes(buf)


@dataclass
class PodServer:
    """A TCP server listening in a pod's namespace, each connection served by ``_serve`` in its own thread."""

    pod: PodInfo
    port: int = SERVER_PORT
    peers: list[tuple[str, int]] = field(default_factory=list)  # every accepted connection's peer address
    _sock: socket.socket | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _conns: set[socket.socket] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Self:
        with netns.entered(self.pod.netns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", self.port))
        sock.listen(128)
        sock.settimeout(0.2)
        self._sock = sock
        self._spawn(self._accept_loop, f"accept-{self.pod.name}")
        return self

    def _spawn(self, target: Callable[..., None], name: str, *args: object) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()]
            self._threads.append(t)
        t.start()

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, peer = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.peers.append((peer[0], peer[1]))
                self._conns.add(conn)
            self._spawn(self._serve_then_close, f"serve-{self.pod.name}-{peer[1]}", conn, (peer[0], peer[1]))

    def _serve_then_close(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        conn.settimeout(IO_TIMEOUT)
        try:
            self._serve(conn, peer)
        except (OSError, ConnectionError):
            pass
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _serve(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        raise NotImplementedError

    @property
    def accepted(self) -> int:
        with self._lock:
            return len(self.peers)

    def close(self) -> None:
        self._stop.set()
        if self._sock is not None:
            self._sock.close()
        with self._lock:
            conns, threads = list(self._conns), list(self._threads)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for t in threads:
            t.join(timeout=IO_TIMEOUT + 5)
        assert not any(t.is_alive() for t in threads), f"server threads of {self.pod.key} still running"


class EchoServer(PodServer):
    """Answers each framed request with a JSON line (peer, sha256, size), then echoes the bytes."""

    def _serve(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        while not self._stop.is_set():
            (size,) = struct.unpack("!Q", _recv_exact(conn, 8))
            if size == 0:
                return
            data = _recv_exact(conn, size)
            line = json.dumps({"peer": list(peer), "sha256": hashlib.sha256(data).hexdigest(), "size": size})
            conn.sendall(line.encode() + b"\n" + data)


@dataclass(frozen=True)
class Echo:
    """What one exchange proved: who the server saw, what it received, what came back."""

    peer: tuple[str, int]
    server_sha256: str
    echoed_sha256: str
    size: int


class Client:
    """A TCP client socket made in a pod's namespace."""

    def __init__(self, pod: PodInfo, address: tuple[str, int], connect_timeout: float = 5.0) -> None:
        self.pod = pod
        with netns.entered(pod.netns):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(connect_timeout)
            self.sock.connect(address)
            self.sock.settimeout(IO_TIMEOUT)
            ip, port = self.sock.getsockname()[:2]
        except BaseException:
            self.sock.close()
            raise
        self.local: tuple[str, int] = (str(ip), int(port))

    def exchange(self, payload: Payload | bytes) -> Echo:
        data = payload.data if isinstance(payload, Payload) else payload
        self.sock.sendall(struct.pack("!Q", len(data)) + data)
        answer = json.loads(_recv_line(self.sock))
        echoed = _recv_exact(self.sock, len(data))
        return Echo(peer=(answer["peer"][0], answer["peer"][1]), server_sha256=answer["sha256"],
                    echoed_sha256=hashlib.sha256(echoed).hexdigest(), size=answer["size"])

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(struct.pack("!Q", 0))
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def transfer(src: PodInfo, dst: PodInfo, payload: Payload, port: int = SERVER_PORT,
             connect_timeout: float = 5.0) -> Echo:
    """One connection src -> dst: the payload up, its echo down; checks both are byte-exact."""
    with Client(src, (dst.ip, port), connect_timeout) as client:
        echo = client.exchange(payload)
    assert echo.size == len(payload.data)
    assert echo.server_sha256 == payload.sha256, f"{src.key} -> {dst.key}: the server received other bytes"
    assert echo.echoed_sha256 == payload.sha256, f"{dst.key} -> {src.key}: the echo came back different"
    return echo


# -- packet captures ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CaptureStats:
    captured: int
    dropped: int


class Capture:
    """tcpdump in a namespace, writing a pcap; bounded by a packet count and a wall-clock limit.

    Use as a context manager; ``stats`` is set when it ends. A capture that hit its packet limit or lost
    packets in the kernel fails (a negative check on an incomplete capture would prove nothing)."""

    def __init__(self, ns: str, iface: str, bpf_filter: str, path: Path, max_packets: int = 200_000,
                 max_seconds: int = 60) -> None:
        self.ns, self.iface, self.filter, self.path = ns, iface, bpf_filter, path
        self.max_packets, self.max_seconds = max_packets, max_seconds
        self.stats: CaptureStats | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._err = bytearray()
        self._reader: threading.Thread | None = None

    def __enter__(self) -> Capture:
        argv = netns.netns_argv(self.ns, [
            "timeout", "-s", "INT", "-k", "5", str(self.max_seconds),
            "tcpdump", "-i", self.iface, "-n", "-U", "--immediate-mode", "-s", "0", "-B", "65536",
            "-c", str(self.max_packets), "-w", str(self.path), self.filter])
        self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, start_new_session=True)
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()
        try:
            eventually(lambda: b"listening on" in self._err or self._proc is None or self._proc.poll() is not None,
                       10, f"tcpdump listening on {self.iface} in {self.ns}")
            if self._proc.poll() is not None:
                raise AssertionError(f"tcpdump exited: {self._err.decode(errors='replace')}")
        except BaseException:
            self._kill()
            raise
        return self

    def _read_stderr(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        for line in self._proc.stderr:
            self._err += line

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait(timeout=10)

    def __exit__(self, *exc: object) -> None:
        proc = self._proc
        assert proc is not None
        time.sleep(0.2)  # the last ACKs and FINs of the traffic just sent
        try:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)  # timeout(1) passes it on; tcpdump then prints its counts
            proc.wait(timeout=10)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            pass
        finally:
            self._kill()
            if self._reader is not None:
                self._reader.join(timeout=5)
        text = self._err.decode(errors="replace")
        captured = re.search(r"(\d+) packets? captured", text)
        received = re.search(r"(\d+) packets? received by filter", text)
        dropped = re.search(r"(\d+) packets? dropped by kernel", text)
        if exc[0] is not None:
            return
        assert captured and received and dropped, f"tcpdump did not report its counts: {text}"
        self.stats = CaptureStats(int(captured.group(1)), int(dropped.group(1)))
        assert self.stats.dropped == 0, f"the capture lost packets: {text}"
        assert int(received.group(1)) == self.stats.captured, f"packets left unwritten: {text}"
        assert self.stats.captured < self.max_packets, "the capture hit its packet limit: it may be incomplete"

    def raw(self) -> bytes:
        return self.path.read_bytes()

    def contains(self, needle: bytes) -> bool:
        return needle in self.raw()


@dataclass(frozen=True)
class Packet:
    src: str
    dst: str
    proto: int
    sport: int | None
    dport: int | None
    tcp_len: int
    tcp_flags: int
    tls_types: tuple[int, ...]  # TLS record types in the frame (22 handshake, 23 application data; for TLS 1.3
    #                             encrypted records the outer "opaque type", always 23)
    handshake: tuple[int, ...]  # TLS handshake message types (1 ClientHello, 2 ServerHello)
    versions: tuple[str, ...]  # supported_versions extension values
    alpn: tuple[str, ...]


    @property
    def syn(self) -> bool:
        """A connection's first packet (SYN without ACK)."""
        return self.tcp_flags & 0x12 == 0x02

    def port(self, port: int) -> bool:
        return port in (self.sport, self.dport)


def _ints(field_text: str) -> tuple[int, ...]:
    return tuple(int(v, 0) for v in field_text.split(",") if v)


def packets(pcap: Path, display_filter: str = "", decode_tls_on: Sequence[int] = (HBONE_PORT,)) -> list[Packet]:
    """The pcap's IPv4 packets as tshark dissects them (TLS decoded on ``decode_tls_on`` ports)."""
    fields = ["frame.len", "frame.cap_len", "ip.src", "ip.dst", "ip.proto", "tcp.srcport", "tcp.dstport", "tcp.len",
              "tcp.flags", "tls.record.content_type", "tls.record.opaque_type", "tls.handshake.type",
              "tls.handshake.extensions.supported_version", "tls.handshake.extensions_alpn_str"]
    argv = ["tshark", "-r", str(pcap), "-n"]
    for port in decode_tls_on:
        argv += ["-d", f"tcp.port=={port},tls"]
    argv += ["-Y", f"ip && ({display_filter})" if display_filter else "ip", "-T", "fields",
             "-E", "separator=\t", "-E", "aggregator=,", "-E", "occurrence=a"]
    for f in fields:
        argv += ["-e", f]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if res.returncode != 0:
        raise AssertionError(f"tshark failed ({res.returncode}): {res.stderr}")
    out = []
    for line in res.stdout.splitlines():
        cols = line.split("\t")
        cols += [""] * (len(fields) - len(cols))
        assert cols[0] == cols[1], f"a truncated frame in {pcap}: {line}"  # the whole packet, or no proof
        cols = cols[2:]
        out.append(Packet(src=cols[0], dst=cols[1], proto=int(cols[2]),
                          sport=int(cols[3]) if cols[3] else None, dport=int(cols[4]) if cols[4] else None,
                          tcp_len=int(cols[5] or 0), tcp_flags=int(cols[6] or "0", 0),
                          tls_types=_ints(cols[7]) + _ints(cols[8]), handshake=_ints(cols[9]),
                          versions=tuple(v for v in cols[10].split(",") if v),
                          alpn=tuple(v for v in cols[11].split(",") if v)))
    return out


def between(pkts: Sequence[Packet], a: str, b: str) -> list[Packet]:
    return [p for p in pkts if {p.src, p.dst} == {a, b}]


# -- the lab: labels, agents, kernel state --------------------------------------------------------------------------
@contextlib.contextmanager
def running_lab(prefix: str, *, nodes: int, pods: int, namespaces: Sequence[str],
                fail_open: bool = False) -> Iterator[tuple[LabInfo, LabPaths]]:
    """A lab with a unique name and its agents, always torn down; fails if anything of it is left."""
    name = f"{prefix}-{secrets.token_hex(3)}"
    try:
        info = control.up(name, nodes=nodes, pods=pods, namespaces=namespaces, fail_open=fail_open, timeout=120)
        yield info, LabPaths.of(name)
    finally:
        control.down(name, timeout=5)
        left = [n for n in netns.list_netns() if n.startswith(rt.netns_prefix(name))]
        left += [str(p) for p in [LabPaths.of(name).root] if p.exists()] + netns_files(name)
        assert not left and not lab_processes(name), f"lab {name} left {left} {lab_processes(name)}"


def netns_files(name: str) -> list[str]:
    """The lab's directories in /etc/netns (pods' hosts files and resolv.conf)."""
    root = hosts.ETC_NETNS
    return [str(root / e) for e in (os.listdir(root) if root.is_dir() else []) if e.startswith(rt.netns_prefix(name))]


def lab_processes(name: str) -> list[str]:
    """Processes whose command line names the lab's directory or namespaces (CA, agents, tcpdump)."""
    marks = (f"{LabPaths.of(name).root}/", f" {rt.netns_prefix(name)}")
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if any(m in cmd for m in marks):
                found.append(f"{entry}: {cmd}")
    return found


def set_namespace_label(paths: LabPaths, namespace: str, value: str | None) -> bool:
    """Set (or with None remove) istio.io/dataplane-mode on a namespace, as `ambit lab label` does.
    Returns whether anything changed."""
    with lab_state.edit(paths.state) as st:
        current = st.namespace_labels(namespace).get(DATAPLANE_MODE)
        if current == value:
            return False
        st.label("Namespace", "", namespace, [(DATAPLANE_MODE, value)], overwrite=True)
    return True


def agent_record(paths: LabPaths, node: str) -> ProcRecord | None:
    rec = ProcRecord.load(paths.pid_file(rt.agent_proc(node)))
    return rec if rec is not None and rt.alive(rec) else None


class AgentLogs:
    """The agents' logs from a point in time on: ``wait(node, text)`` finds lines written after ``mark()``."""

    def __init__(self, paths: LabPaths, nodes: Sequence[str]) -> None:
        self.paths, self.nodes = paths, list(nodes)
        self.offsets: dict[str, int] = {}
        self.mark()

    def _file(self, node: str) -> Path:
        return self.paths.log_file(rt.agent_proc(node))

    def mark(self) -> None:
        self.offsets = {n: self._file(n).stat().st_size if self._file(n).exists() else 0 for n in self.nodes}

    def since(self, node: str) -> str:
        return rt.read_from(self._file(node), self.offsets.get(node, 0))

    def wait(self, expected: Mapping[str, Sequence[str]], timeout: float) -> float:
        """Wait until every node's log (since the mark) contains each of its strings; returns the seconds
        waited."""
        start = time.monotonic()
        eventually(lambda: all(s in self.since(node) for node, wanted in expected.items() for s in wanted),
                   timeout, f"agent log lines {expected}")
        return time.monotonic() - start


def ambit_filters(ns: str, dev: str) -> list[str]:
    """Our tc filters on a device's ingress hook (one line per filter)."""
    out = netns.run(ns, ["tc", "filter", "show", "dev", dev, "ingress"]).stdout
    return [line for line in out.splitlines() if "ambit_" in line]


def all_filters(ns: str, dev: str) -> list[str]:
    """Every tc filter (with a handle) on a device's ingress hook."""
    out = netns.run(ns, ["tc", "filter", "show", "dev", dev, "ingress"]).stdout
    return [line for line in out.splitlines() if " handle " in line]


def mark_rules(ns: str) -> list[str]:
    """`ip rule` lines that match the agent's mark."""
    out = netns.run(ns, ["ip", "-4", "rule", "show"]).stdout
    return [line.strip() for line in out.splitlines() if "fwmark 0x539" in line]


def local_routes(ns: str, table: int = 100) -> list[str]:
    out = netns.run(ns, ["ip", "-4", "route", "show", "table", str(table)]).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def listening(ns: str, ports: Sequence[int]) -> list[str]:
    """Listening TCP sockets of a namespace on any of ``ports``."""
    expr = " or ".join(f"sport = :{p}" for p in ports)
    out = netns.run(ns, ["ss", "-Htln", f"( {expr} )"]).stdout
    return [line for line in out.splitlines() if line.strip()]


def wait_listeners_gone(ns: str, ports: Sequence[int] = (15001, 15006, 15008), timeout: float = 10) -> None:
    """Wait until no socket listens on ``ports`` in ``ns``. A SIGKILLed agent can outlive `stop_agents()` by
    a few milliseconds: its main thread is already a zombie (what `rt.alive()` takes for gone) while its other
    threads still exit, and its sockets close only after the last one: until then the kernel still
    completes handshakes on its listeners."""
    eventually(lambda: not listening(ns, ports), timeout, f"the killed agent's listeners gone from {ns}")


@dataclass(frozen=True)
class Sock:
    local: tuple[str, int]
    peer: tuple[str, int]
    process: str


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def tcp_sockets(ns: str, port: int) -> list[Sock]:
    """Established TCP sockets in a namespace with ``port`` at either end (`ss -tnp`)."""
    out = netns.run(ns, ["ss", "-Htnp", "state", "established",
                         f"( sport = :{port} or dport = :{port} )"]).stdout
    found = []
    for line in out.splitlines():
        cols = line.split()
        if len(cols) >= 4:
            found.append(Sock(_addr(cols[2]), _addr(cols[3]), " ".join(cols[4:])))
    return found
