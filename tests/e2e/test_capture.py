"""Capture end to end in a dual-stack lab (2 nodes x 2 pods, IPv4 and IPv6): real eBPF programs, a transparent
relay standing in for the agent's proxies (bench.capture_probe.TransparentRelay: one dual-stack listener per port,
accept, getsockname() = original destination, connect there bound to the client's address, transparent, relay).

Pods: A, B on node 0; C, D on node 1. Every pod runs a dual-stack echo server on 8080 and 15008 that answers
`peer=<ip>:<port> got=<data>`, so a test sees the source address the destination saw; a relayed connection
shows the client's address with another port, a direct one the client's own port. The IPv4 tests run exactly as
on an IPv4-only lab; the `_v6` tests repeat the paths over IPv6 (addresses from tests.fixtures.dual_stack).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator

import pytest

from agent.capture import (
    EventType,
    Hook,
    Listener,
    Reason,
    Redirector,
    Verdict,
    bpfsys,
    host_ifname_for,
    netns,
    sysctls,
)
from agent.capture.attach import CLSACT_INGRESS, Backend
from agent.capture.programs import POD_PROG
from agent.capture.rtnl import Rtnl
from agent.lab import Lab, Node, Pod
from bench.capture_probe import EchoServer, TransparentRelay, exchange, private_bpffs
from tests.fixtures import packets
from tests.fixtures.dual_stack import add_ipv6
from tests.fixtures.repo import REPO

pytestmark = pytest.mark.timeout(60)
bcc = pytest.importorskip("bcc", reason="Debian's python3-bpfcc is not importable")

FAIL_TIMEOUT = 1.0  # seconds a connection that must fail gets


# -- fixtures -----------------------------------------------------------------------------------------
IPv6Of = Callable[[Pod | Node], str]


@pytest.fixture(scope="module")
def dual_stack_lab() -> Iterator[tuple[Lab, dict[str, str]]]:
    lab = Lab.up(nodes=2, pods_per_node=2)
    try:
        yield lab, add_ipv6(lab)
    finally:
        lab.down()


@pytest.fixture(scope="module")
def lab(dual_stack_lab: tuple[Lab, dict[str, str]]) -> Lab:
    return dual_stack_lab[0]


@pytest.fixture(scope="module")
def ip6(dual_stack_lab: tuple[Lab, dict[str, str]]) -> IPv6Of:
    """The IPv6 address of a pod or node of the lab."""
    return lambda x: dual_stack_lab[1][x.netns]


@pytest.fixture(scope="module")
def bpffs() -> Iterator[str]:
    with private_bpffs() as d:
        yield d


@pytest.fixture(scope="module")
def servers(lab: Lab) -> Iterator[None]:
    running = [EchoServer(p.netns, ports=(8080, 15008)).start() for p in lab.pods]
    running += [EchoServer(p.netns, ports=(8081,), greet_only=True).start() for p in lab.pods]
    try:
        yield
    finally:
        for s in running:
            s.close()


def leftovers(lab: Lab, bpffs: str) -> list[str]:
    """Anything of ours still in the lab's node namespaces: filters, tcx links, rules, routes, pins, settings."""
    found = []
    for node in lab.nodes:
        for link in lab.links(node.netns):
            for hook, attach_type in (("ingress", bpfsys.BPF_TCX_INGRESS), ("egress", bpfsys.BPF_TCX_EGRESS)):
                out = lab.exec(node.netns, ["tc", "filter", "show", "dev", link["ifname"], hook]).stdout
                if "ambit" in out:
                    found.append(f"{node.netns}/{link['ifname']} {hook}: {out.strip()}")
                with netns.entered(node.netns):
                    if bpfsys.tcx_query(link["ifindex"], attach_type):
                        found.append(f"{node.netns}/{link['ifname']}: tcx {hook} programs")
        for key, (_value, default) in sysctls.NODE_SETTINGS.items():
            if sysctls.read(node.netns, key) != default:
                found.append(f"{node.netns}: {key} left at the capture's value")
        for family in ("-4", "-6"):
            rules = lab.exec(node.netns, ["ip", family, "rule"]).stdout
            if "0x539" in rules:
                found.append(f"{node.netns}: {rules}")
            # `ip route show table 100` fails if the table was never made
            table = lab.exec(node.netns, ["ip", family, "route", "show", "table", "100"], check=False)
            if table.stdout.strip():
                found.append(f"{node.netns}: table 100 ({family}) not empty")
    for root, _dirs, files in os.walk(os.path.join(bpffs, "ambit")):
        found += [os.path.join(root, f) for f in files]
    return found


class Agents:
    """Started Redirectors by node index, made on first use (compiling takes ~0.9 s)."""

    def __init__(self, lab: Lab, bpffs: str) -> None:
        self.lab, self.bpffs = lab, bpffs
        self.started: dict[int, Redirector] = {}

    def __getitem__(self, node: int) -> Redirector:
        if node not in self.started:
            ns = self.lab.nodes[node].netns
            self.started[node] = Redirector(["eth0"], netns=ns, bpffs=self.bpffs).start()
        return self.started[node]


@pytest.fixture
def agents(lab: Lab, bpffs: str, servers: None) -> Iterator[Agents]:
    """Redirectors per node (auto backend: tcx with the private bpffs); the lab is checked clean after."""
    made = Agents(lab, bpffs)
    try:
        yield made
    finally:
        for r in made.started.values():
            r.close()
    assert leftovers(lab, bpffs) == []


@pytest.fixture
def relays(lab: Lab) -> Iterator[list[TransparentRelay]]:
    running = [TransparentRelay(node.netns).start() for node in lab.nodes]
    try:
        yield running
    finally:
        for r in running:
            r.close()


# -- helpers ------------------------------------------------------------------------------------------
def talk(src: Pod | Node, dst_ip: str, port: int = 8080, timeout: float = 3.0) -> tuple[str, bool]:
    """(source IP the server saw, True if the connection went direct = same source port)."""
    (_ip, my_port), reply = exchange(src.netns, dst_ip, port, payload=b"hi", timeout=timeout)
    assert reply.startswith(b"peer="), reply
    seen = reply.split(b" ", 1)[0].removeprefix(b"peer=").decode()
    ip, port_seen = seen.rsplit(":", 1)
    return ip, int(port_seen) == my_port


def fails(src: Pod, dst_ip: str, port: int = 8080) -> bool:
    try:
        exchange(src.netns, dst_ip, port, timeout=FAIL_TIMEOUT)
    except OSError:
        return True
    return False


@contextlib.contextmanager
def wire(lab: Lab, node_index: int, host: str, what: str = "tcp") -> Iterator[list[str]]:
    """Capture `what` (TCP; "ip6": everything IPv6, also TCP behind extension headers, which tcpdump's "tcp"
    does not follow) of `host` on the inter-node link of a node (its port on the switch) while the block runs;
    the yielded list is filled with tcpdump's lines at the end."""
    lines: list[str] = []
    proc = lab.popen(
        lab.switch,
        ["tcpdump", "-i", f"n{node_index}", "-nn", "-l", "-c", "50", f"{what} and host {host}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 10
        while "listening on" not in proc.stderr.readline():
            assert time.monotonic() < deadline and proc.poll() is None, "tcpdump did not start"
        yield lines
        time.sleep(0.3)
    finally:
        proc.terminate()
        out, _err = proc.communicate(timeout=10)
        lines += [line for line in out.splitlines() if line.strip()]


# -- tests ----------------------------------------------------------------------------------------------
def test_outbound_cross_node_captured_with_original_destination(
    lab: Lab, agents: Agents, relays: list[TransparentRelay]
) -> None:
    a, _b, c, _d = lab.pods
    agents[0].enroll(a.ip, a.host_ifname)
    seen_ip, direct = talk(a, c.ip)
    assert seen_ip == a.ip and not direct  # relayed, yet the destination sees the client pod
    acc = relays[0].accepted
    assert len(acc) == 1 and acc[0].listener_port == 15001
    assert acc[0].original_dst == (c.ip, 8080) and acc[0].peer[0] == a.ip and acc[0].upstream_ok
    events = agents[0].poll_events(200)
    syn = [e for e in events if e.type is EventType.SYN and e.verdict is Verdict.REDIRECTED]
    assert [(e.src, e.dst, e.dport, e.listener_port, e.hook) for e in syn] == [(a.ip, c.ip, 8080, 15001, Hook.POD)]
    assert any(e.type is EventType.FIN for e in events)
    counters = agents[0].counters()
    assert counters["redirect_out"] == 1 and counters["events_lost"] == 0 == agents[0].lost_events


def test_inbound_hbone_and_plaintext_ports(lab: Lab, agents: Agents, relays: list[TransparentRelay]) -> None:
    _a, b, c, d = lab.pods
    agents[1].enroll(c.ip, c.host_ifname)
    assert talk(b, c.ip, 8080) == (b.ip, False)
    assert talk(b, c.ip, 15008) == (b.ip, False)
    got = {(x.listener_port, x.original_dst, x.peer[0]) for x in relays[1].accepted}
    assert got == {(15006, (c.ip, 8080), b.ip), (15008, (c.ip, 15008), b.ip)}
    assert talk(b, d.ip, 8080) == (b.ip, True)  # D is not enrolled
    assert relays[0].accepted == []  # nothing on node 0: B is not enrolled there
    counters = agents[1].counters()
    assert counters["redirect_in"] == 1 and counters["redirect_hbone"] == 1


def test_not_captured_unenrolled_and_udp(lab: Lab, agents: Agents, relays: list[TransparentRelay]) -> None:
    a, b, c, _d = lab.pods
    agents[0].enroll(a.ip, a.host_ifname)
    assert talk(b, c.ip) == (b.ip, True)  # un-enrolled pod: direct
    # UDP (DNS) from an enrolled pod is never captured
    with netns.entered(c.netns):
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with netns.entered(a.netns):
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with rx, tx:
        rx.bind((c.ip, 5353))
        rx.settimeout(3)
        tx.bind((a.ip, 0))
        tx.sendto(b"dns?", (c.ip, 5353))
        data, src = rx.recvfrom(100)
        assert data == b"dns?" and src == tx.getsockname()
    assert relays[0].accepted == []
    events = agents[0].poll_events(100)
    assert all(b.ip not in (e.src, e.dst) for e in events), events


def test_the_door_takes_node_traffic_but_probe_ports(lab: Lab, agents: Agents, relays: list[TransparentRelay]) -> None:
    """A connection the node itself opens to an enrolled pod crosses only the pod's door (its veth's egress):
    captured as the pod's inbound (15006, the node's address kept), except to the ports the pod's probes name;
    with node_passes every connection of the node passes, as in Istio."""
    a, *_ = lab.pods
    node = lab.nodes[0]
    agents[0].enroll(a.ip, a.host_ifname)
    assert talk(node, a.ip) == (node.ip, False)  # through the agent's relay
    assert [(x.listener_port, x.original_dst, x.peer[0]) for x in relays[0].accepted] == [(15006, (a.ip, 8080),
                                                                                           node.ip)]
    syn = [e for e in agents[0].poll_events(200) if e.type is EventType.SYN and e.verdict is Verdict.REDIRECTED]
    assert [(e.src, e.dst, e.listener_port, e.hook) for e in syn] == [(node.ip, a.ip, 15006, Hook.DOOR)]
    agents[0].set_probe_ports({a.ip: [8080]})
    assert talk(node, a.ip) == (node.ip, True)  # the probe port: direct
    assert agents[0].counters()["probe_passed"] > 0
    agents[0].set_probe_ports({})
    agents[0].set_node_passes(True)
    assert talk(node, a.ip) == (node.ip, True)
    agents[0].set_node_passes(False)
    assert talk(node, a.ip) == (node.ip, False)
    assert len(relays[0].accepted) == 2 and agents[0].counters()["redirect_door"] == 2


def test_enroll_and_release_with_pods_running(lab: Lab, agents: Agents, relays: list[TransparentRelay]) -> None:
    a, _b, c, _d = lab.pods
    with netns.entered(a.netns):
        before = socket.create_connection((c.ip, 8080), timeout=3)  # opened before enrollment
    with before:
        before.sendall(b"one ")
        agents[0].enroll(a.ip, a.host_ifname)
        assert talk(a, c.ip) == (a.ip, False)  # new connection: captured from the moment of enroll
        before.sendall(b"two")  # the old one keeps working, uncaptured
        before.shutdown(socket.SHUT_WR)
        reply = before.makefile("rb").read()
        assert reply == f"peer={a.ip}:{before.getsockname()[1]} got=one two".encode()
    assert len(relays[0].accepted) == 1
    agents[0].release(a.ip)
    assert talk(a, c.ip) == (a.ip, True)  # released: direct again
    assert len(relays[0].accepted) == 1
    assert agents[0].enrolled() == {} and agents[0].enrolled_in_kernel() == {}
    assert [att.ifindex for att in agents[0].attachments()] == [agents[0].uplinks["eth0"]]


def test_hook_steers_replies_of_unenrolled_same_node_pod(
    lab: Lab, agents: Agents, relays: list[TransparentRelay]
) -> None:
    a, b, _c, _d = lab.pods
    agents[0].enroll(a.ip, a.host_ifname)
    agents[0].hook(b.host_ifname)  # B is not enrolled; the relay connects to it as A
    assert talk(a, b.ip) == (a.ip, False)
    assert relays[0].accepted[0].original_dst == (b.ip, 8080)
    agents[0].unhook(b.host_ifname)
    assert {att.ifindex for att in agents[0].attachments()} == {
        agents[0].uplinks["eth0"],
        socket_ifindex(lab.nodes[0].netns, a.host_ifname),
    }


def socket_ifindex(ns: str, ifname: str) -> int:
    with netns.entered(ns):
        return socket.if_nametoindex(ifname)


def test_fail_closed_without_listener_and_fail_open_setting(lab: Lab, agents: Agents) -> None:
    a, _b, c, _d = lab.pods
    agents[0].enroll(a.ip, a.host_ifname)  # no relay: the agent's proxies are down
    with wire(lab, 0, a.ip) as leaked:
        assert fails(a, c.ip)
    assert leaked == []
    drops = [e for e in agents[0].poll_events(100) if e.type is EventType.DROP]
    assert drops and drops[0].reason is Reason.NO_LISTENER and drops[0].verdict is Verdict.DROPPED
    assert agents[0].counters()["drop_no_listener"] >= 1

    agents[0].set_fail_open(True)
    with wire(lab, 0, a.ip) as seen:
        assert talk(a, c.ip) == (a.ip, True)  # forwarded unchanged
    assert any(f"{a.ip}." in line and "Flags [S]" in line for line in seen)  # the capture does see leaks
    agents[0].set_fail_open(False)
    assert fails(a, c.ip)


AGENT_PROCESS = textwrap.dedent(
    """
    import signal, sys
    from agent.capture import Redirector
    from bench.capture_probe import TransparentRelay
    pod_ip, ifname, backend, bpffs = sys.argv[1:5]
    r = Redirector(["eth0"], backend=backend, bpffs=bpffs).start()
    r.enroll(pod_ip, ifname)
    relay = TransparentRelay(None, ports=(15001,)).start()
    print("ready", flush=True)
    signal.pause()
    """
)


@pytest.mark.parametrize("backend", ["clsact", "tcx"])
def test_agent_killed_fails_closed_nothing_leaks(lab: Lab, bpffs: str, servers: None, backend: Backend) -> None:
    a, _b, c, _d = lab.pods
    node = lab.nodes[0]
    proc = lab.popen(
        node.netns,
        [sys.executable, "-c", AGENT_PROCESS, a.ip, a.host_ifname, backend, bpffs],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        assert talk(a, c.ip) == (a.ip, False)  # captured while the agent runs
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        with wire(lab, 0, a.ip) as leaked:
            assert fails(a, c.ip)
        assert leaked == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        cleanup = Redirector(["eth0"], netns=node.netns, bpffs=bpffs).start()
        cleanup.reconcile({})
        cleanup.close()
    assert leftovers(lab, bpffs) == []


@pytest.mark.parametrize(("first", "second"), [("clsact", "clsact"), ("tcx", "tcx"), ("clsact", "tcx")])
def test_restart_reconcile_leaves_exactly_the_desired_state(
    lab: Lab, bpffs: str, servers: None, relays: list[TransparentRelay], first: Backend, second: Backend
) -> None:
    a, b, c, _d = lab.pods
    node = lab.nodes[0]
    crashed = Redirector(["eth0"], netns=node.netns, bpffs=bpffs, backend=first).start()
    crashed.enroll(a.ip, a.host_ifname)
    crashed.enroll(b.ip, b.host_ifname)
    if first == "clsact":  # plus a stray duplicate filter, as a buggy earlier version might have left
        with netns.entered(node.netns):
            rtnl = Rtnl()
        with rtnl:
            ix = rtnl.link(name=a.host_ifname).index
            rtnl.bpf_filter(ix, CLSACT_INGRESS, 9, 9, crashed.prog_fd(POD_PROG), POD_PROG, replace=False)
    crashed.close(detach=False)  # like kill -9: programs, rules and pins stay

    restarted = Redirector(["eth0"], netns=node.netns, bpffs=bpffs, backend=second).start()
    try:
        result = restarted.reconcile({a.ip: a.host_ifname})
        atts = restarted.attachments()
        pod_ix = socket_ifindex(node.netns, a.host_ifname)
        assert sorted((att.ifindex, att.direction) for att in atts) == sorted(
            [(restarted.uplinks["eth0"], "ingress"), (pod_ix, "ingress"), (pod_ix, "egress")]  # the pod's door
        )
        assert {att.backend for att in atts} == {second}
        assert any("lxc1" in r for r in result.removed)
        door_settings = {
            name: sysctls.read(node.netns, f"net/ipv4/conf/{ifname}/accept_local")
            for name, ifname in (("a", a.host_ifname), ("b", b.host_ifname), ("default", "default"))}
        assert door_settings["a"] == "1" and door_settings["b"] == door_settings["default"], door_settings
        for family in ("-4", "-6"):
            rules = lab.exec(node.netns, ["ip", family, "rule"]).stdout
            assert rules.count("fwmark 0x539 lookup 100") == 1 and rules.count("goto 32766") == 1
            assert lab.exec(node.netns, ["ip", family, "route", "show", "table", "100"]).stdout.count("local") == 1
        for ifname in ("lxc0", "lxc1", "eth0"):
            for hook in ("ingress", "egress"):
                out = lab.exec(node.netns, ["tc", "filter", "show", "dev", ifname, hook]).stdout
                ours = [line for line in out.splitlines() if "ambit" in line]
                assert len(ours) <= (0 if second == "tcx" else 1), out
        assert restarted.enrolled_in_kernel() == {a.ip: socket_ifindex(node.netns, a.host_ifname)}
        assert talk(a, c.ip) == (a.ip, False)  # captured by the restarted agent
        assert talk(b, c.ip) == (b.ip, True)  # no longer desired: direct
    finally:
        restarted.close()
    assert leftovers(lab, bpffs) == []


def test_port_reuse_over_time_wait_goes_through_sk_lookup(
    lab: Lab, agents: Agents, relays: list[TransparentRelay]
) -> None:
    a, _b, _c, d = lab.pods
    agents[0].register_listener(Listener.OUTBOUND, relays[0].listeners[15001])
    agents[0].enroll(a.ip, a.host_ifname)
    for _ in range(3):  # the greet-only server closes first, so does the relay: TIME_WAIT on node 0
        with netns.entered(a.netns):
            s = socket.socket()
        with s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((a.ip, 41234))
            s.settimeout(3)
            s.connect((d.ip, 8081))
            assert s.makefile("rb").read().startswith(f"peer={a.ip}:".encode())
    assert "41234" in lab.exec(lab.nodes[0].netns, ["ss", "-Htan", "state", "time-wait"]).stdout
    assert agents[0].counters()["lookup_selected"] >= 2
    assert len(relays[0].accepted) == 3


def test_full_ring_buffer_counts_lost_events(
    lab: Lab, bpffs: str, servers: None, relays: list[TransparentRelay]
) -> None:
    a, _b, c, _d = lab.pods
    r = Redirector(["eth0"], netns=lab.nodes[0].netns, bpffs=bpffs, ringbuf_pages=1).start()  # ~100 records
    try:
        r.enroll(a.ip, a.host_ifname)
        for _ in range(60):  # >= 4 events each (SYN, FIN, steered SYN-ACK and FIN), nobody polling
            assert talk(a, c.ip) == (a.ip, False)
        received = len(r.poll_events(100))
        lost = r.lost_events
        assert lost > 0 and 0 < received < 60 * 4
        assert received + lost >= 60 * 4
    finally:
        r.close()
    assert leftovers(lab, bpffs) == []


def test_auto_backend_without_bpffs_is_clsact_and_bad_interface_is_named(
    lab: Lab, bpffs: str, servers: None, relays: list[TransparentRelay]
) -> None:
    a, _b, c, _d = lab.pods
    r = Redirector(["eth0"], netns=lab.nodes[0].netns, bpffs="/nonexistent-bpffs").start()
    try:
        assert r.backend == "clsact"
        with pytest.raises(LookupError, match="no-such-veth"):
            r.enroll(a.ip, "no-such-veth")
        r.enroll(a.ip, a.host_ifname)
        assert talk(a, c.ip) == (a.ip, False)
    finally:
        r.close()
    assert leftovers(lab, bpffs) == []


def test_host_ifname_for(lab: Lab) -> None:
    a, b, c, _d = lab.pods
    node = lab.nodes[0]
    assert host_ifname_for(a.ip, netns=node.netns) == a.host_ifname
    assert host_ifname_for(b.ip, netns=node.netns) == b.host_ifname
    with pytest.raises(LookupError):
        host_ifname_for(c.ip, netns=node.netns)


# -- IPv6, in the same lab ----------------------------------------------------------------------------
def dual(pod: Pod, ip6: IPv6Of) -> dict[str, str]:
    """What the agent passes for a dual-stack pod: each of its addresses, with its one interface."""
    return {pod.ip: pod.host_ifname, ip6(pod): pod.host_ifname}


def test_outbound_v6_captured_with_original_destination_and_source_kept(
    lab: Lab, ip6: IPv6Of, agents: Agents, relays: list[TransparentRelay]
) -> None:
    a, _b, c, _d = lab.pods
    agents[0].reconcile(dual(a, ip6))
    assert agents[0].enrolled_in_kernel().keys() == {a.ip, ip6(a)}
    assert talk(a, ip6(c)) == (ip6(a), False)  # relayed; the replies from node 1 steered back at the uplink
    assert talk(a, c.ip) == (a.ip, False)  # the pod's IPv4 too
    assert [(x.listener_port, x.original_dst, x.peer[0], x.upstream_ok) for x in relays[0].accepted] == [
        (15001, (ip6(c), 8080), ip6(a), True), (15001, (c.ip, 8080), a.ip, True)]
    syn = [e for e in agents[0].poll_events(200) if e.type is EventType.SYN and e.verdict is Verdict.REDIRECTED]
    assert [(e.src, e.dst, e.dport, e.listener_port, e.hook) for e in syn] == [
        (ip6(a), ip6(c), 8080, 15001, Hook.POD), (a.ip, c.ip, 8080, 15001, Hook.POD)]
    agents[0].release(ip6(a))  # one address released: that family goes direct, the other stays captured
    assert talk(a, ip6(c)) == (ip6(a), True)
    assert talk(a, c.ip) == (a.ip, False)
    assert agents[0].counters()["redirect_out"] == 3


def test_inbound_v6_hbone_and_plaintext_ports_at_the_uplink(
    lab: Lab, ip6: IPv6Of, agents: Agents, relays: list[TransparentRelay]
) -> None:
    _a, b, c, d = lab.pods
    agents[1].reconcile(dual(c, ip6))
    assert talk(b, ip6(c), 8080) == (ip6(b), False)
    assert talk(b, ip6(c), 15008) == (ip6(b), False)
    got = {(x.listener_port, x.original_dst, x.peer[0]) for x in relays[1].accepted}
    assert got == {(15006, (ip6(c), 8080), ip6(b)), (15008, (ip6(c), 15008), ip6(b))}
    syn = [e for e in agents[1].poll_events(200) if e.type is EventType.SYN and e.verdict is Verdict.REDIRECTED]
    assert {(e.src, e.dst, e.listener_port, e.hook) for e in syn} == {
        (ip6(b), ip6(c), 15006, Hook.UPLINK), (ip6(b), ip6(c), 15008, Hook.UPLINK)}
    assert talk(b, ip6(d), 8080) == (ip6(b), True)  # D is not enrolled
    counters = agents[1].counters()
    assert counters["redirect_in"] == 1 and counters["redirect_hbone"] == 1


def test_the_door_v6_takes_node_and_pod_traffic_but_probe_ports(
    lab: Lab, ip6: IPv6Of, agents: Agents, relays: list[TransparentRelay]
) -> None:
    """IPv6 has no accept_local or rp_filter: what the door hands back (the node's own address as source, or a
    neighbour's routed via its own veth) is taken without either setting."""
    a, b, *_ = lab.pods
    node = lab.nodes[0]
    agents[0].reconcile(dual(a, ip6))
    assert talk(node, ip6(a)) == (ip6(node), False)  # through the agent's relay, the node's address kept
    assert talk(b, ip6(a)) == (ip6(b), False)  # a same-node pod: only the door sees it
    assert [(x.listener_port, x.original_dst, x.peer[0]) for x in relays[0].accepted] == [
        (15006, (ip6(a), 8080), ip6(node)), (15006, (ip6(a), 8080), ip6(b))]
    syn = [e for e in agents[0].poll_events(200) if e.type is EventType.SYN and e.verdict is Verdict.REDIRECTED]
    assert [(e.src, e.dst, e.listener_port, e.hook) for e in syn] == [
        (ip6(node), ip6(a), 15006, Hook.DOOR), (ip6(b), ip6(a), 15006, Hook.DOOR)]
    agents[0].set_probe_ports({a.ip: [8080], ip6(a): [8080]})
    assert talk(node, ip6(a)) == (ip6(node), True)  # the probe port, over IPv6: direct
    assert talk(node, ip6(a), 15008) == (ip6(node), False)  # any other port: captured
    assert agents[0].counters()["probe_passed"] > 0
    agents[0].set_probe_ports({a.ip: [8080]})
    assert talk(node, ip6(a)) == (ip6(node), False)
    assert agents[0].counters()["redirect_door"] == 4


def test_hook_v6_steers_replies_of_unenrolled_same_node_pod(
    lab: Lab, ip6: IPv6Of, agents: Agents, relays: list[TransparentRelay]
) -> None:
    a, b, _c, _d = lab.pods
    agents[0].reconcile(dual(a, ip6), hooked=[b.host_ifname])  # B is not enrolled; the relay connects to it as A
    assert talk(a, ip6(b)) == (ip6(a), False)
    assert relays[0].accepted[0].original_dst == (ip6(b), 8080)
    assert agents[0].counters()["steered"] > 0


def forge_syn_v6(src: Pod, claimed: str, dst: str, port: int = 8080) -> bool:
    """From `src`, a connection whose packets claim the address `claimed` (IPV6_TRANSPARENT lets the pod bind
    an address it does not hold); True if it connected."""
    with netns.entered(src.netns):
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    with s:
        s.setsockopt(socket.IPPROTO_IPV6, 75, 1)  # IPV6_TRANSPARENT
        s.bind((claimed, 0))
        s.settimeout(FAIL_TIMEOUT)
        try:
            s.connect((dst, port))
        except OSError:
            return False
        return True


def test_spoofed_v6_source_dropped_and_counted(
    lab: Lab, ip6: IPv6Of, agents: Agents, relays: list[TransparentRelay]
) -> None:
    a, b, c, d = lab.pods
    agents[0].reconcile(dual(a, ip6), hooked=[b.host_ifname])  # the agent hooks every local pod's veth
    assert not forge_syn_v6(b, ip6(a), ip6(c))  # the same node's neighbour, on its own veth
    assert not forge_syn_v6(d, ip6(a), ip6(b))  # another node: arrives on node 0's uplink
    drops = [e for e in agents[0].poll_events(200) if e.type is EventType.DROP]
    assert {(e.src, e.dst, e.hook) for e in drops} == {(ip6(a), ip6(c), Hook.POD), (ip6(a), ip6(b), Hook.UPLINK)}
    assert all(e.reason is Reason.SPOOFED and e.verdict is Verdict.DROPPED for e in drops)
    assert agents[0].counters()["drop_spoofed"] >= 2
    assert relays[0].accepted == []  # never captured as A
    assert talk(a, ip6(c)) == (ip6(a), False)  # A itself is fine


def test_fail_closed_v6_without_listener(lab: Lab, ip6: IPv6Of, agents: Agents) -> None:
    a, _b, c, _d = lab.pods
    agents[0].reconcile(dual(a, ip6))  # no relay: the agent's proxies are down
    with wire(lab, 0, ip6(a)) as leaked:
        assert fails(a, ip6(c))
    assert leaked == []
    drops = [e for e in agents[0].poll_events(100) if e.type is EventType.DROP]
    assert drops and {(e.src, e.dst, e.reason) for e in drops} == {(ip6(a), ip6(c), Reason.NO_LISTENER)}
    agents[0].set_fail_open(True)
    with wire(lab, 0, ip6(a)) as seen:
        assert talk(a, ip6(c)) == (ip6(a), True)  # forwarded unchanged
    assert any(f"{ip6(a)}." in line and "Flags [S]" in line for line in seen)  # the capture does see leaks


def test_v6_extension_headers_are_skipped(
    lab: Lab, ip6: IPv6Of, agents: Agents, relays: list[TransparentRelay]
) -> None:
    """A connection whose every packet carries a hop-by-hop and a destination options header (PadN) is
    captured like any other: those headers do not hide TCP from the programs."""
    a, _b, c, _d = lab.pods
    agents[1].reconcile(dual(c, ip6))
    pad8 = bytes([0, 0, 1, 4, 0, 0, 0, 0])  # next header (the kernel's), length 0 (8 bytes), PadN of 4
    with netns.entered(a.netns):
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    with s:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_HOPOPTS, pad8)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_DSTOPTS, pad8)
        s.settimeout(3)
        with wire(lab, 1, ip6(c), "ip6") as seen:
            s.connect((ip6(c), 8080))
            s.sendall(b"hi")
            s.shutdown(socket.SHUT_WR)
            assert s.makefile("rb").read().startswith(f"peer={ip6(a)}:".encode())
    assert [(x.listener_port, x.original_dst) for x in relays[1].accepted] == [(15006, (ip6(c), 8080))]
    assert any("HBH" in line and "DSTOPT" in line for line in seen), seen  # the headers were on the wire


def test_v6_tcp_fragments_to_and_from_an_enrolled_pod_are_dropped(
    lab: Lab, ip6: IPv6Of, agents: Agents, relays: list[TransparentRelay]
) -> None:
    """A SYN sent as IPv6 fragments would be reassembled by the pod's kernel past the capture: the door drops
    those going into an enrolled pod, its veth's program those leaving it; a pod that is not enrolled still gets
    them (the watch sees them), and neither the fragments nor the relay see a captured connection."""
    a, b, c, _d = lab.pods
    agents[0].reconcile(dual(a, ip6))  # b's veth has no program: what b sends a meets only a's door
    with packets.TcpWatch(c.netns, socket.AF_INET6) as watch:
        packets.send(b.netns, ip6(c), packets.fragmented_syn(ip6(b), ip6(c), 40010, 8080))
        assert watch.seen(40010, within=3), "fragments between pods that are not enrolled must pass"
    with packets.TcpWatch(a.netns, socket.AF_INET6) as watch:
        packets.send(b.netns, ip6(a), packets.fragmented_syn(ip6(b), ip6(a), 40011, 8080))
        assert not watch.seen(40011, within=1), "fragments reached the enrolled pod"
    with packets.TcpWatch(c.netns, socket.AF_INET6) as watch:
        packets.send(a.netns, ip6(c), packets.fragmented_syn(ip6(a), ip6(c), 40012, 8080))
        assert not watch.seen(40012, within=1), "the enrolled pod's fragments left it"
    drops = [e for e in agents[0].poll_events(200) if e.type is EventType.DROP]
    assert {(e.src, e.dst, e.hook) for e in drops} == {(ip6(b), ip6(a), Hook.DOOR), (ip6(a), ip6(c), Hook.POD)}
    assert all(e.reason is Reason.FRAGMENT and (e.sport, e.dport) == (0, 0) for e in drops)
    assert agents[0].counters()["drop_fragment"] >= 2
    assert relays[0].accepted == []


def test_port_reuse_v6_over_time_wait_goes_through_sk_lookup(
    lab: Lab, ip6: IPv6Of, agents: Agents, relays: list[TransparentRelay]
) -> None:
    """The relay's one dual-stack listener, registered once, serves IPv6 lookups too."""
    a, _b, _c, d = lab.pods
    agents[0].register_listener(Listener.OUTBOUND, relays[0].listeners[15001])
    agents[0].reconcile(dual(a, ip6))
    for _ in range(3):  # the greet-only server closes first, so does the relay: TIME_WAIT on node 0
        with netns.entered(a.netns):
            s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        with s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((ip6(a), 41235))
            s.settimeout(3)
            s.connect((ip6(d), 8081))
            assert s.makefile("rb").read().startswith(f"peer={ip6(a)}:".encode())
    assert "41235" in lab.exec(lab.nodes[0].netns, ["ss", "-Htan6", "state", "time-wait"]).stdout
    assert agents[0].counters()["lookup_selected"] >= 2
    assert len(relays[0].accepted) == 3


def test_bad_address_is_named_and_changes_nothing(lab: Lab, agents: Agents) -> None:
    a, *_ = lab.pods
    with pytest.raises(ValueError, match=r"'10\.200\.0\.300'"):
        agents[0].reconcile({a.ip: a.host_ifname, "10.200.0.300": a.host_ifname})
    with pytest.raises(ValueError, match="'fd00::zz'"):
        agents[0].enroll("fd00::zz", a.host_ifname)
    assert agents[0].enrolled_in_kernel() == {}


def test_host_ifname_for_v6(lab: Lab, ip6: IPv6Of) -> None:
    a, b, c, _d = lab.pods
    node = lab.nodes[0]
    assert host_ifname_for(ip6(a), netns=node.netns) == a.host_ifname
    assert host_ifname_for(ip6(b), netns=node.netns) == b.host_ifname
    with pytest.raises(LookupError):
        host_ifname_for(ip6(c), netns=node.netns)
