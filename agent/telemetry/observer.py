"""The Observer gRPC service (agent/telemetry/observer.proto), on a unix socket and/or a mutual-TLS TCP port.

    server = ObserverServer(recorder)
    await server.start(unix_path="/run/ambit/observer.sock", tcp="0.0.0.0:4244", tls=ServerTls(files, [operator]))
    ...
    await server.stop()

Who may call it (agent/telemetry/observer_tls.py): anyone who can open the unix socket (mode 0660), and over
TCP only a client with a certificate from the client CA bundle carrying an allowed identity. There is no
plaintext TCP listener.

GetFlows semantics, as Hubble's: the last ``number`` flows of the buffer (the first with ``first``) that
pass the whitelist and not the blacklist, within since/until; then, with ``follow``, a NodeStatusEvent
(NODE_CONNECTED: the buffered part is over) and every new matching flow as it is recorded. Nothing is
dropped silently: when a request reaches back past flows the buffer has overwritten, the answer starts
with a LostEvent (HUBBLE_RING_BUFFER) counting them; a follower too slow for the flow rate gets a
LostEvent (OBSERVER_EVENTS_QUEUE); events the kernel lost appear where they happened
(PERF_EVENT_RING_BUFFER).
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal

from agent import __version__
from agent.rpc import RpcError, StatusCode
from agent.rpc.server import Call, Method, RpcServer
from agent.telemetry import observer_pb2 as pb
from agent.telemetry.filters import FilterError, Predicate, build_request
from agent.telemetry.model import Entry, Flow, LostEvent, LostSource, timestamp
from agent.telemetry.observer_tls import ServerTls, admit
from agent.telemetry.recorder import FlowRecorder
from agent.telemetry.ring import DEFAULT_FOLLOWER_QUEUE, FlowRing, Snapshot
from hbone import format_address, parse_host_port

log = logging.getLogger(__name__)

SERVICE = "/ambit.observer.v1.Observer"


def _ns(request: pb.GetFlowsRequest, name: Literal["since", "until"]) -> int | None:
    if not request.HasField(name):
        return None
    value = request.since if name == "since" else request.until
    return value.seconds * 1_000_000_000 + value.nanos


def select(snapshot: Snapshot, predicate: Predicate, number: int, first: bool, since_ns: int | None,
           until_ns: int | None) -> list[Entry]:
    """The buffered part of a GetFlows answer, oldest first (LostEvent markers in place, and one in front
    when the request reached back past overwritten flows)."""
    if number == 0 and since_ns is None and until_ns is None:
        return []
    limit = number or None

    def in_range(e: Entry) -> bool:
        return (since_ns is None or e.time_ns >= since_ns) and (until_ns is None or e.time_ns <= until_ns)

    entries = [e for e in snapshot.entries if in_range(e) and (not isinstance(e, Flow) or predicate(e))]
    taken = 0
    if limit is not None:
        order = range(len(entries)) if first else range(len(entries) - 1, -1, -1)
        cut = None
        for i in order:
            if isinstance(entries[i], Flow):
                taken += 1
                if taken == limit:
                    cut = i
                    break
        if cut is not None:
            entries = entries[: cut + 1] if first else entries[cut:]
    reached_back = first or limit is None or taken < limit
    oldest = snapshot.oldest_ns
    if snapshot.evicted and reached_back and (since_ns is None or oldest is None or since_ns < oldest):
        entries.insert(0, LostEvent(oldest or 0, LostSource.HUBBLE_RING_BUFFER, snapshot.evicted))
    return entries


class ObserverService:
    """GetFlows and ServerStatus over one node's ring."""

    def __init__(self, ring: FlowRing, node: str, *, follower_queue: int = DEFAULT_FOLLOWER_QUEUE) -> None:
        self.ring = ring
        self.node = node
        self.follower_queue = follower_queue
        self.allowed_clients: frozenset[str] = frozenset()  # TLS clients' SPIFFE IDs (set with the TLS listener)
        self._started = time.monotonic_ns()
        self._version = __version__

    def methods(self) -> dict[str, Method]:
        return {f"{SERVICE}/GetFlows": Method(pb.GetFlowsRequest.FromString, streaming=self.GetFlows),
                f"{SERVICE}/ServerStatus": Method(pb.ServerStatusRequest.FromString, unary=self.ServerStatus)}

    def _admit(self, call: Call) -> None:
        denial = admit(call.peer, self.allowed_clients)
        if denial is not None:
            log.warning("refused an Observer client at %s: %s", call.peer.address, denial.message)
            raise RpcError(denial.code, denial.message)

    def _response(self, entry: Entry) -> pb.GetFlowsResponse:
        if isinstance(entry, Flow):
            return pb.GetFlowsResponse(flow=entry.to_proto(), node_name=self.node, time=timestamp(entry.time_ns))
        return pb.GetFlowsResponse(lost_events=entry.to_proto(), node_name=self.node, time=timestamp(entry.time_ns))

    async def GetFlows(self, request: pb.GetFlowsRequest, call: Call) -> AsyncIterator[pb.GetFlowsResponse]:
        self._admit(call)
        try:
            predicate = build_request(request.whitelist, request.blacklist)
        except FilterError as e:
            raise RpcError(StatusCode.INVALID_ARGUMENT, str(e)) from None
        since, until = _ns(request, "since"), _ns(request, "until")
        if request.follow and (request.first or until is not None):
            raise RpcError(StatusCode.INVALID_ARGUMENT, "follow cannot be combined with first or until")
        if since is not None and until is not None and since > until:
            raise RpcError(StatusCode.INVALID_ARGUMENT, "since is after until")
        follower = None
        if request.follow:
            snapshot, follower = self.ring.follow(predicate, self.follower_queue)
        else:
            snapshot = self.ring.snapshot()
        try:
            for entry in select(snapshot, predicate, request.number, request.first, since, until):
                yield self._response(entry)
            if follower is None:
                return
            yield pb.GetFlowsResponse(
                node_status=pb.NodeStatusEvent(state_change=pb.NODE_CONNECTED, node_names=[self.node],
                                               message="following new flows"),
                node_name=self.node, time=timestamp(time.time_ns()))
            while True:
                for entry in await follower.get():
                    if since is None or entry.time_ns >= since:
                        yield self._response(entry)
        finally:
            if follower is not None:
                follower.close()

    async def ServerStatus(self, request: pb.ServerStatusRequest, call: Call) -> pb.ServerStatusResponse:
        self._admit(call)
        ring = self.ring
        ring.catch_up()
        return pb.ServerStatusResponse(num_flows=ring.num_flows, max_flows=ring.capacity, seen_flows=ring.seen,
                                       lost_events=ring.lost, node_name=self.node, version=self._version,
                                       uptime_ns=time.monotonic_ns() - self._started)


def _claim_unix_path(unix_path: str) -> tuple[Path, Path]:
    """(the socket path, a sibling to bind first). The socket is bound beside the path and renamed over it once
    it serves, so a client always finds a server there: a stale file is replaced, and so is a live server's
    (an upgrade: the next agent takes the path over while the old one drains; newest wins, as for the pid)."""
    path = Path(unix_path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise OSError(f"{path} exists and is not a socket")
    beside = path.with_name(f".{path.name}.{os.getpid()}")
    beside.unlink(missing_ok=True)
    return path, beside


class ObserverServer:
    """The Observer service of one agent, served with ``agent.rpc``."""

    def __init__(self, recorder: FlowRecorder, ring: FlowRing | None = None, *,
                 follower_queue: int = DEFAULT_FOLLOWER_QUEUE) -> None:
        self.service = ObserverService(ring if ring is not None else recorder.ring, recorder.node,
                                       follower_queue=follower_queue)
        self._server: RpcServer | None = None
        self.unix_path: str | None = None
        self._unix_inode = 0
        self.tcp_port: int | None = None
        self._tcp_host = ""

    async def start(self, unix_path: str | None = None, tcp: str | None = None, *, tls: ServerTls | None = None,
                    unix_mode: int = 0o660) -> None:
        """Serve on a unix socket path and/or a TCP "host:port" (port 0: any; see ``tcp_port``), the latter
        with mutual TLS only."""
        if unix_path is None and tcp is None:
            raise ValueError("give a unix socket path, a TCP address, or both")
        if tcp is not None and tls is None:
            raise ValueError(f"the Observer serves TCP ({tcp}) over mutual TLS only: give its certificate, key and "
                             "client CA, or serve the unix socket alone")
        server = RpcServer(self.service.methods())
        beside: Path | None = None
        try:
            if unix_path is not None:
                path, beside = _claim_unix_path(unix_path)
                await server.listen_unix(str(beside))
                self.unix_path = str(path)
            if tcp is not None and tls is not None:
                host, port = parse_host_port(tcp, "the Observer's TCP address", listen=True)
                # SO_REUSEPORT: the next agent binds beside this one
                self.tcp_port = await server.listen_tls(host, port, tls.listener_context())
                self._tcp_host = host
                self.service.allowed_clients = tls.allowed_clients
        except (OSError, ValueError) as e:
            await server.stop()
            if beside is not None:
                beside.unlink(missing_ok=True)
            where = tcp if self.unix_path else unix_path
            self.unix_path = self.tcp_port = None
            raise OSError(f"cannot serve the Observer on {where}: {e}") from None
        if self.unix_path is not None and beside is not None:
            os.chmod(beside, unix_mode)
            os.replace(beside, self.unix_path)
            self._unix_inode = os.stat(self.unix_path).st_ino
        self._server = server
        tcp_text = tcp and f"{tcp.rpartition(':')[0]}:{self.tcp_port} (mutual TLS)"
        log.info("flow observer for node %s on %s", self.service.node,
                 ", ".join(a for a in (self.unix_path, tcp_text) if a))

    @property
    def addresses(self) -> list[str]:
        """Addresses ``ambit observe --server`` accepts (the TCP one on loopback when it listens on every address)."""
        out = []
        if self.unix_path is not None:
            out.append(self.unix_path)
        if self.tcp_port is not None:
            host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(self._tcp_host, self._tcp_host)
            out.append(format_address(host, self.tcp_port))
        return out

    async def stop(self, grace: float | None = 1.0) -> None:
        if self._server is None:
            return
        await self._server.stop(grace)
        self._server = None
        if self.unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.unix_path).st_ino == self._unix_inode:  # still ours, not the next agent's
                    os.unlink(self.unix_path)
