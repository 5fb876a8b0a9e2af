"""Issue 3 end to end, on a real `ambit lab` (network namespaces, the CA, one agent per node, eBPF capture).

What the wire shows is the proof: tcpdump runs on node-1's port of the lab's switch (the only link between
node-1 and the rest of the lab) with a capture filter for pod traffic (10.200.0.0/16), and tshark dissects
the pcap. Every payload carries a random 32-byte marker every 4 KiB; it must never appear in the raw capture
of mesh traffic and must appear in the capture of traffic that is not in the mesh (which proves the capture
sees the payload when it passes in the clear).

Layout of the main lab: 2 nodes, 3 pods each; pod k of node i is ``app-i-k``; ``app-i-1`` and ``app-i-3`` are
in namespace ``mesh`` (enrolled before each test), ``app-i-2`` in ``plain`` (not enrolled before each test).
Every pod runs an echo server on 8080 for the whole module (no pod is ever restarted). A second, smaller lab
runs its agents with --fail-open. Both labs have unique names and are always torn down.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.lab import control
from agent.lab.runtime import LabInfo, LabPaths, PodInfo
from tests.fixtures import lab_helpers as h
from tests.fixtures.lab_helpers import HBONE_PORT, SERVER_PORT, Capture, Client, EchoServer, Payload
from tests.fixtures.machine import needs_bcc

pytestmark = [
    needs_bcc,
    pytest.mark.skipif(bool(h.tools_missing()),
                       reason=f"needs {', '.join(h.tools_missing())}"),
]

MESH, PLAIN = "mesh", "plain"
PAYLOAD = 4 << 20  # bytes each way per transfer
EFFECT_WITHIN = 1.5  # seconds from a label change until both agents have applied it ("~1 s")
POD_FILTER = "net 10.200.0.0/16"
AGENT_START_TIMEOUT = 60.0


@dataclass
class MeshLab:
    info: LabInfo
    paths: LabPaths
    servers: dict[str, EchoServer] = field(default_factory=dict)

    def pod(self, name: str) -> PodInfo:
        return next(p for p in self.info.pods if p.name == name)

    def node_netns(self, node: str) -> str:
        return self.info.node(node).netns

    @property
    def node_names(self) -> list[str]:
        return [n.name for n in self.info.nodes]

    def wire(self, tmp_path: Path, name: str) -> Capture:
        """A capture of pod traffic on node-1's link to the switch."""
        port = f"n{self.info.node('node-1').index}"
        return Capture(self.info.switch, port, POD_FILTER, tmp_path / f"{name}.pcap")

    def ensure_agents(self) -> None:
        """Every agent of the lab running (a failed test may have left one stopped)."""
        missing = [n for n in self.node_names if h.agent_record(self.paths, n) is None]
        if missing:
            control.stop_agents(self.paths, missing)  # forget stale records
            control.start_agents(self.info, self.paths, missing, AGENT_START_TIMEOUT)

    def label(self, namespace: str, enrolled: bool) -> float | None:
        """Enroll (or release) a namespace; returns the seconds until every agent with a pod of it applied the
        change (None when nothing changed)."""
        logs = h.AgentLogs(self.paths, self.node_names)
        if not h.set_namespace_label(self.paths, namespace, "ambient" if enrolled else None):
            return None
        expected: dict[str, list[str]] = {}
        for pod in self.info.pods:
            if pod.namespace == namespace:
                line = f"enrolled {pod.key} (" if enrolled else f"released {pod.ip} ("
                expected.setdefault(pod.node, []).append(line)
        return logs.wait(expected, timeout=10)


@contextlib.contextmanager
def serving(info: LabInfo, paths: LabPaths) -> Iterator[MeshLab]:
    """The lab with an echo server in every pod, closed on the way out."""
    lab = MeshLab(info, paths)
    try:
        for pod in info.pods:
            lab.servers[pod.name] = EchoServer(pod).start()
        yield lab
    finally:
        for server in lab.servers.values():
            server.close()


@pytest.fixture(scope="module")
def mesh_lab() -> Iterator[MeshLab]:
    with h.running_lab("e2e", nodes=2, pods=3, namespaces=(MESH, PLAIN)) as (info, paths), serving(info, paths) as lab:
        yield lab


@pytest.fixture
def lab(mesh_lab: MeshLab) -> MeshLab:
    """The main lab with both agents running, ``mesh`` enrolled and ``plain`` not."""
    mesh_lab.ensure_agents()
    mesh_lab.label(MESH, True)
    mesh_lab.label(PLAIN, False)
    return mesh_lab


def assert_only_hbone(pcap: Path, a: PodInfo, b: PodInfo) -> list[h.Packet]:
    """Every packet between the two pods is TCP to or from 15008 and none carries the server's port."""
    pkts = h.between(h.packets(pcap), a.ip, b.ip)
    assert pkts, f"no packet between {a.key} and {b.key} on the wire"
    assert all(p.proto == 6 for p in pkts), "non-TCP traffic between the pods"
    stray = [p for p in pkts if HBONE_PORT not in (p.sport, p.dport)]
    assert not stray, f"TCP between the pods not on {HBONE_PORT}: {stray[:5]}"
    return pkts


def assert_in_the_clear(cap: Capture, payload: Payload, a: PodInfo, b: PodInfo, *, never_meshed: bool = False) -> None:
    """The payload went from ``a`` to ``b``'s own port, visibly, and not through a tunnel.

    With ``never_meshed`` no packet between the pods may involve 15008. Otherwise an idle HBONE connection
    of the agents' pools (from when the pods were in the mesh) may still exchange a few control bytes; the
    payload must not be among them: no new tunnel connection, and far less than the payload on 15008."""
    pkts = h.between(h.packets(cap.path), a.ip, b.ip)
    direct = sum(p.tcp_len for p in pkts if p.src == a.ip and p.dport == SERVER_PORT)
    assert direct >= len(payload.data), f"only {direct} bytes {a.key} -> {b.key}:{SERVER_PORT} on the wire"
    tunnelled = [p for p in pkts if p.port(HBONE_PORT)]
    if never_meshed:
        assert tunnelled == [], f"tunnelled although never in the mesh: {tunnelled[:3]}"
    assert not any(p.syn for p in tunnelled), "a new HBONE connection although not in the mesh"
    assert sum(p.tcp_len for p in tunnelled) < 64 << 10, "payload-sized traffic on 15008"
    assert cap.contains(payload.marker), "the payload is not visible in the clear: the capture proves nothing"


# -- 1 --------------------------------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_enrolled_pods_on_two_nodes_talk_only_hbone_mtls(lab: MeshLab, tmp_path: Path) -> None:
    a, b = lab.pod("app-1-1"), lab.pod("app-2-1")
    payload = Payload.make(PAYLOAD)
    with lab.wire(tmp_path, "enrolled") as cap:
        there = h.transfer(a, b, payload)
        back = h.transfer(b, a, payload)
    assert there.peer[0] == a.ip, f"{b.key} saw {there.peer} as its peer, not {a.key}"
    assert back.peer[0] == b.ip, f"{a.key} saw {back.peer} as its peer, not {b.key}"

    pkts = assert_only_hbone(cap.path, a, b)
    for client, server in ((a, b), (b, a)):  # one tunnel each way, each to the DESTINATION pod's 15008
        tunnel = [p for p in pkts if (p.src, p.dst, p.dport) == (client.ip, server.ip, HBONE_PORT)
                  or (p.src, p.dst, p.sport) == (server.ip, client.ip, HBONE_PORT)]
        hello = [p for p in tunnel if 1 in p.handshake]
        answer = [p for p in tunnel if 2 in p.handshake]
        assert hello and answer, f"no TLS handshake {client.key} -> {server.key}:{HBONE_PORT} on the wire"
        assert all(p.src == client.ip and "0x0304" in p.versions and "h2" in p.alpn for p in hello), hello
        assert all(p.src == server.ip and p.versions == ("0x0304",) for p in answer), answer  # TLS 1.3 chosen
        for src in (client, server):  # the payload crossed as TLS application data, each way
            sent = [p for p in tunnel if p.src == src.ip]
            assert sum(p.tcp_len for p in sent) > PAYLOAD, f"{src.key}: less than the payload on {HBONE_PORT}"
            assert any(23 in p.tls_types for p in sent), f"{src.key}: no TLS application data records"
    assert not cap.contains(payload.marker), "payload bytes crossed the wire in the clear"


# -- 2 --------------------------------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_unenrolled_namespace_passes_in_the_clear_untouched(lab: MeshLab, tmp_path: Path) -> None:
    a, b = lab.pod("app-1-2"), lab.pod("app-2-2")
    payload = Payload.make(PAYLOAD)
    with lab.wire(tmp_path, "plain") as cap:
        with Client(a, (b.ip, SERVER_PORT)) as client:
            for node in lab.node_names:  # no socket of the agent (or any) in the nodes: not proxied
                assert h.tcp_sockets(lab.node_netns(node), SERVER_PORT) == [], node
            there = client.exchange(payload)
        back = h.transfer(b, a, payload)
    assert there.server_sha256 == there.echoed_sha256 == payload.sha256
    assert there.peer == client.local and back.peer[0] == b.ip
    assert_in_the_clear(cap, payload, a, b, never_meshed=True)
    assert_in_the_clear(cap, payload, b, a, never_meshed=True)
    assert not any(p.tls_types for p in h.between(h.packets(cap.path), a.ip, b.ip))


# -- 3 --------------------------------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_enroll_and_leave_while_pods_run(lab: MeshLab, tmp_path: Path) -> None:
    a, b = lab.pod("app-1-2"), lab.pod("app-2-2")
    server = lab.servers[b.name]
    listener = server.listeners[SERVER_PORT]
    netns_ids = [os.stat(f"/run/netns/{p.netns}").st_ino for p in (a, b)]
    small = Payload.make(64 << 10)

    # Before: direct. A connection opened now outlives the enrollment (it is not captured, never broken).
    accepted = server.accepted
    before = Client(a, (b.ip, SERVER_PORT))
    try:
        assert before.exchange(small).peer == before.local

        took = lab.label(PLAIN, True)
        assert took is not None and took <= EFFECT_WITHIN, f"enrollment took {took:.2f}s"
        enrolled_payload = Payload.make(PAYLOAD)
        with lab.wire(tmp_path, "enrolled-live") as cap:
            echo = h.transfer(a, b, enrolled_payload)
            held = Client(a, (b.ip, SERVER_PORT))  # a mesh connection, open across the leave below
            assert held.exchange(small).peer[0] == a.ip
        assert echo.peer[0] == a.ip
        assert_only_hbone(cap.path, a, b)
        assert not cap.contains(enrolled_payload.marker)
        assert before.exchange(small).peer == before.local, "a connection from before the enrollment broke"

        # Leave: released within the same bound, the mesh connection is reset (not left to hang), new
        # connections go direct again.
        try:
            took = lab.label(PLAIN, False)
            assert took is not None and took <= EFFECT_WITHIN, f"leaving took {took:.2f}s"
            held.sock.settimeout(5)
            with pytest.raises(ConnectionError):  # reset (or EOF), at once: not a timeout
                held.exchange(small)
        finally:
            held.sock.close()
        clear = Payload.make(PAYLOAD)
        with lab.wire(tmp_path, "released") as cap:
            echo = h.transfer(a, b, clear)
        assert echo.peer[0] == a.ip
        assert_in_the_clear(cap, clear, a, b)
        assert before.exchange(small).peer == before.local
    finally:
        before.close()
    # The same server process (listener) and the same pod namespaces served everything: no restart.
    assert server.listeners[SERVER_PORT] is listener and listener.fileno() >= 0
    assert server.accepted - accepted == 4  # before, the enrolled transfer, held, the released transfer
    assert [os.stat(f"/run/netns/{p.netns}").st_ino for p in (a, b)] == netns_ids


# -- 4 --------------------------------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_same_node_pair_is_captured_and_authorized(lab: MeshLab, tmp_path: Path) -> None:
    a, c = lab.pod("app-1-1"), lab.pod("app-1-3")
    assert a.node == c.node and a.namespace == c.namespace == MESH
    agent = h.agent_record(lab.paths, a.node)
    assert agent is not None
    payload = Payload.make(PAYLOAD)
    with lab.wire(tmp_path, "same-node") as cap, Client(a, (c.ip, SERVER_PORT)) as client:
        echo = client.exchange(payload)
        assert echo.server_sha256 == echo.echoed_sha256 == payload.sha256
        socks = h.tcp_sockets(lab.node_netns(a.node), SERVER_PORT)
    # The agent holds both ends in the node: the pod's connection (accepted with the original destination
    # as its local address) and its own upstream connection, made from the client pod's address.
    accepted = [s for s in socks if s.local == (c.ip, SERVER_PORT) and s.peer == client.local]
    upstream = [s for s in socks if s.peer == (c.ip, SERVER_PORT) and s.local[0] == a.ip]
    assert len(accepted) == 1 and len(upstream) == 1, socks
    assert all(f"pid={agent.pid}," in s.process for s in accepted + upstream), socks
    assert echo.peer == upstream[0].local and echo.peer[0] == a.ip  # authorized, and c saw a as its peer
    assert h.between(h.packets(cap.path), a.ip, c.ip) == [], "same-node traffic left the node"
    assert not cap.contains(payload.marker)


# -- 5 --------------------------------------------------------------------------------------------------------------
def _attachments(lab: MeshLab, node: str) -> dict[str, list[str]]:
    ns = lab.node_netns(node)
    devs = [p.host_ifname for p in lab.info.pods if p.node == node] + [lab.info.node(node).uplink]
    return {dev: h.all_filters(ns, dev) for dev in devs}


def assert_kernel_state_exact(lab: MeshLab, node: str) -> None:
    """One filter (ours) per pod veth and uplink, the two mark rules, one local route: nothing twice."""
    ns = lab.node_netns(node)
    for dev, filters in _attachments(lab, node).items():
        assert len(filters) == 1 and "ambit_" in filters[0], f"{node} {dev}: {filters}"
    rules = h.mark_rules(ns)
    assert len(rules) == 2, rules
    assert rules[0].startswith("99:") and "iif lo goto 32766" in rules[0], rules
    assert rules[1].startswith("100:") and rules[1].endswith("lookup 100"), rules
    assert h.local_routes(ns) == ["local default dev lo scope host"], h.local_routes(ns)


def _while_node1_agent_is_down(lab: MeshLab, tmp_path: Path, held: Client) -> None:
    """Enrolled pods of node-1 cannot open connections, in either direction, what they send on a connection
    the dead agent had proxied goes nowhere, and nothing leaks; pods outside the mesh are not affected."""
    a, b, c = lab.pod("app-1-1"), lab.pod("app-2-1"), lab.pod("app-1-3")
    p1, p2 = lab.pod("app-1-2"), lab.pod("app-2-2")  # not in the mesh
    accepted_before = lab.servers[b.name].accepted
    payload = Payload.make(PAYLOAD)
    reverse: list[BaseException | float] = []

    def from_the_other_node() -> None:
        """b -> a: b's agent (alive) takes the connection, but its tunnel to a's node cannot be had."""
        start = time.monotonic()
        try:
            with Client(b, (a.ip, SERVER_PORT)) as client:
                client.sock.settimeout(15)
                client.exchange(payload)
        except OSError as e:
            reverse.append(e)
        reverse.append(time.monotonic() - start)

    with lab.wire(tmp_path, "agent-down") as cap:
        thread = threading.Thread(target=from_the_other_node, daemon=True)
        thread.start()
        held.sock.settimeout(2)
        with pytest.raises(OSError):  # reset, or no answer ever (the packets are dropped)
            held.exchange(payload)
        for dst in (b, c):  # to another node and on the same node: the SYN is dropped
            start = time.monotonic()
            with pytest.raises((TimeoutError, ConnectionRefusedError)):
                Client(a, (dst.ip, SERVER_PORT), connect_timeout=2)
            assert time.monotonic() - start < 5
        plain = Payload.make(256 << 10)
        assert h.transfer(p1, p2, plain).peer[0] == p1.ip
        thread.join(timeout=30)
    assert not thread.is_alive()
    # b's agent accepted, then reset the connection when its tunnel dial timed out (10 s): refused, not hung.
    assert len(reverse) == 2 and isinstance(reverse[0], ConnectionError), f"{b.key} -> {a.key}: {reverse}"
    assert isinstance(reverse[1], float) and reverse[1] < 15, reverse
    assert lab.servers[b.name].accepted == accepted_before, "a connection reached b while a's agent was down"
    assert not cap.contains(payload.marker), "payload leaked while the agent was down"
    pkts = h.between(h.packets(cap.path), a.ip, b.ip)
    assert all(p.port(HBONE_PORT) for p in pkts), f"{a.key} <-> {b.key} not on {HBONE_PORT}: {pkts[:5]}"
    assert not any(p.syn and p.src == a.ip for p in pkts), f"a new connection of {a.key} left node-1"
    assert any(p.syn and p.src == b.ip and p.dport == HBONE_PORT for p in pkts), "b's agent never tried its tunnel"
    assert cap.contains(plain.marker)


@pytest.mark.timeout(120)
def test_agent_killed_fails_closed_then_restart_reconciles(lab: MeshLab, tmp_path: Path) -> None:
    a, b, c = lab.pod("app-1-1"), lab.pod("app-2-1"), lab.pod("app-1-3")
    for node in lab.node_names:
        assert_kernel_state_exact(lab, node)
    attached = _attachments(lab, "node-1")

    with Client(a, (b.ip, SERVER_PORT)) as held:  # proxied by the agent when it dies
        assert held.exchange(Payload.make(64 << 10)).peer[0] == a.ip
        out = control.stop_agents(lab.paths, ["node-1"], kill=True)
        assert any("SIGKILL" in line for line in out), out
        assert h.agent_record(lab.paths, "node-1") is None
        h.wait_listeners_gone(lab.node_netns("node-1"))
        assert _attachments(lab, "node-1") == attached, "SIGKILL must leave the programs in place (fail closed)"
        _while_node1_agent_is_down(lab, tmp_path, held)

    logs = h.AgentLogs(lab.paths, ["node-1"])
    control.start_agents(lab.info, lab.paths, ["node-1"], AGENT_START_TIMEOUT)
    logs.wait({"node-1": [f"enrolled {a.key} (", f"enrolled {c.key} ("]}, timeout=10)
    after = Payload.make(PAYLOAD)
    with lab.wire(tmp_path, "agent-back") as cap:
        assert h.transfer(a, b, after).peer[0] == a.ip
        assert h.transfer(b, a, after).peer[0] == b.ip
        assert h.transfer(a, c, after).peer[0] == a.ip
    assert_only_hbone(cap.path, a, b)
    assert not cap.contains(after.marker)
    for node in lab.node_names:
        assert_kernel_state_exact(lab, node)


# -- 6 --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def open_lab() -> Iterator[MeshLab]:
    with h.running_lab("e2eopen", nodes=2, pods=1, namespaces=("default",), fail_open=True) as (info, paths), \
            serving(info, paths) as lab:
        yield lab


@pytest.mark.timeout(120)
def test_fail_open_agents_killed_traffic_passes_directly(open_lab: MeshLab, tmp_path: Path) -> None:
    lab = open_lab
    a, b = lab.pod("app-1-1"), lab.pod("app-2-1")
    assert lab.info.agent_flags == ["--fail-open"]
    took = lab.label("default", True)
    assert took is not None and took <= EFFECT_WITHIN, f"enrollment took {took}s"
    captured = Payload.make(256 << 10)
    with lab.wire(tmp_path, "open-agents-up") as cap:
        assert h.transfer(a, b, captured).peer[0] == a.ip
    assert_only_hbone(cap.path, a, b)  # fail-open changes nothing while the agents run

    attached = {n: _attachments(lab, n) for n in lab.node_names}
    out = control.stop_agents(lab.paths, lab.node_names, kill=True)
    assert sum("SIGKILL" in line for line in out) == 2, out
    for node in lab.node_names:
        h.wait_listeners_gone(lab.node_netns(node))
    assert {n: _attachments(lab, n) for n in lab.node_names} == attached  # the programs are still there

    payload = Payload.make(PAYLOAD)
    with lab.wire(tmp_path, "open-agents-down") as cap:
        there = h.transfer(a, b, payload)
        back = h.transfer(b, a, payload)
    assert there.peer[0] == a.ip and back.peer[0] == b.ip
    assert_in_the_clear(cap, payload, a, b)
    assert_in_the_clear(cap, payload, b, a)

