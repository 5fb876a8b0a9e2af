"""``ambit observe``: flags -> filters (hubble's rules), times, lab discovery, golden output of every format
(fixed flows of two nodes, merged in time order), and end to end against real ObserverServers."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.cli import observe as observe_cli
from agent.telemetry import observer_pb2 as pb
from agent.telemetry.model import (
    ACK,
    SYN,
    Direction,
    Endpoint,
    EventType,
    Flow,
    LostEvent,
    LostSource,
    Reporter,
    Verdict,
)
from agent.telemetry.observer import ObserverServer
from agent.telemetry.printer import Printer
from agent.telemetry.recorder import FlowRecorder
from tests.conftest import ObserverTlsMaterial
from tests.fixtures.repo import REPO

GOLDEN = REPO / "tests" / "fixtures" / "golden"
UPDATE = os.environ.get("AMBIT_UPDATE_GOLDEN") == "1"

# -- flags -> filters -------------------------------------------------------------------------------------------


def filters(*argv: str) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    query = observe_cli.query_from_args(observe_cli.parser().parse_args(["--server", "x:1", *argv]))
    from google.protobuf.json_format import MessageToDict

    def d(fs: object) -> list[dict[str, object]]:
        return [MessageToDict(f, preserving_proto_field_name=True) for f in fs]  # type: ignore[attr-defined]

    return d(query.request.whitelist), d(query.request.blacklist)


FILTER_CASES: list[tuple[list[str], list[dict[str, object]], list[dict[str, object]]]] = [
    ([], [], []),
    (["--from-pod", "shop/web", "--to-port", "5432"],
     [{"source_pod": ["shop/web"], "destination_port": [5432]}], []),
    (["--pod", "web"], [{"source_pod": ["default/web"]}, {"destination_pod": ["default/web"]}], []),
    (["-n", "shop", "--pod", "web"],
     [{"source_pod": ["shop/web"], "source_namespace": ["shop"]},
      {"destination_pod": ["shop/web"], "destination_namespace": ["shop"]}], []),
    (["--pod", "/web", "--verdict", "dropped"],
     [{"source_pod": ["/web"], "verdict": ["DROPPED"]}, {"destination_pod": ["/web"], "verdict": ["DROPPED"]}], []),
    (["--from-ip", "10.0.0.1", "--from-ip", "10.0.0.2"], [{"source_ip": ["10.0.0.1", "10.0.0.2"]}], []),
    (["--to-namespace", "data", "--not", "--from-namespace", "data"],
     [{"destination_namespace": ["data"]}], [{"source_namespace": ["data"]}]),
    (["--not", "--label", "app=debug", "-t", "drop"],
     [{"event_type": ["DROP"]}], [{"source_label": ["app=debug"]}, {"destination_label": ["app=debug"]}]),
    (["--identity", "ns/shop/sa/web", "--traffic-direction", "ingress", "--node-name", "node-*"],
     [{"source_identity": ["ns/shop/sa/web"], "traffic_direction": ["INGRESS"], "node_name": ["node-*"]},
      {"destination_identity": ["ns/shop/sa/web"], "traffic_direction": ["INGRESS"], "node_name": ["node-*"]}], []),
    (["--protocol", "TCP", "--from-identity", "spiffe://cluster.local/ns/a/sa/b"],
     [{"protocol": ["tcp"], "source_identity": ["spiffe://cluster.local/ns/a/sa/b"]}], []),
]


@pytest.mark.parametrize(("argv", "whitelist", "blacklist"), FILTER_CASES, ids=[" ".join(c[0]) or "none"
                                                                             for c in FILTER_CASES])
def test_flags_to_filters(argv: list[str], whitelist: list[dict[str, object]],
                          blacklist: list[dict[str, object]]) -> None:
    assert filters(*argv) == (whitelist, blacklist)


@pytest.mark.parametrize(("argv", "number", "first", "follow", "limit"), [
    ([], 20, False, False, 20),
    (["--last", "5"], 5, False, False, 5),
    (["--first", "3"], 3, True, False, 3),
    (["--all"], 2**64 - 1, False, False, None),
    (["-f"], 0, False, True, None),
    (["-f", "--last", "2"], 2, False, True, 2),
    (["--since", "5m"], 0, False, False, None),
])
def test_selectors(argv: list[str], number: int, first: bool, follow: bool, limit: int | None) -> None:
    query = observe_cli.query_from_args(observe_cli.parser().parse_args(["--server", "x:1", *argv]))
    assert (query.request.number, query.request.first, query.request.follow, query.limit) == \
        (number, first, follow, limit)


@pytest.mark.parametrize(("argv", "message"), [
    (["--last", "2", "--first", "3"], "only one of"),
    (["-f", "--first", "3"], "--follow"),
    (["--last", "0"], ">= 1"),
    (["--port", "80", "--not"], "--not must be followed"),
    (["--since", "1m", "--until", "2m"], "after --until"),
])
def test_bad_selectors(argv: list[str], message: str) -> None:
    err = io.StringIO()
    assert observe_cli.main(["--server", "x:1", *argv], out=io.StringIO(), err=err) == 2
    assert message in err.getvalue()


def test_parse_time() -> None:
    now = 1_700_000_000.0
    assert observe_cli.parse_time("5m", now) == now - 300
    assert observe_cli.parse_time("1h30m", now) == now - 5400
    assert observe_cli.parse_time("250ms", now) == pytest.approx(now - 0.25)
    assert observe_cli.parse_time("2023-11-14T22:13:20Z", now) == 1_700_000_000.0
    assert observe_cli.parse_time("2023-11-14T23:13:20+01:00", now) == 1_700_000_000.0
    with pytest.raises(Exception, match="neither a duration"):
        observe_cli.parse_time("yesterday", now)


def test_grpc_target() -> None:
    assert observe_cli.grpc_target("10.0.0.7:4244") == "10.0.0.7:4244"
    assert observe_cli.grpc_target("/run/x.sock") == "unix:/run/x.sock"
    assert observe_cli.grpc_target("unix:/run/x.sock") == "unix:/run/x.sock"
    assert observe_cli.grpc_target("obs.sock") == f"unix:{os.path.abspath('obs.sock')}"


# -- lab discovery ------------------------------------------------------------------------------------------------


def write_lab(root: Path, name: str, nodes: list[dict[str, str]], **extra: object) -> Path:
    lab = root / name
    lab.mkdir(parents=True)
    (lab / "lab.json").write_text(json.dumps({"name": name, "phase": "running", "nodes": nodes, **extra}))
    return lab


def test_lab_servers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AMBIT_LAB", raising=False)
    with pytest.raises(observe_cli.ObserveError, match="no lab found"):
        observe_cli.lab_servers(None, tmp_path)
    lab = write_lab(tmp_path, "one", [{"name": "node-1"}, {"name": "node-2", "observer": "10.9.0.2:4244"}])
    assert observe_cli.lab_servers(None, tmp_path) == [str(lab / "observer" / "node-1.sock"), "10.9.0.2:4244"]
    write_lab(tmp_path, "two", [{"name": "node-1"}])
    with pytest.raises(observe_cli.ObserveError, match="labs present: one, two"):
        observe_cli.lab_servers(None, tmp_path)
    monkeypatch.setenv("AMBIT_LAB", "two")
    assert observe_cli.lab_servers(None, tmp_path) == [str(tmp_path / "two" / "observer" / "node-1.sock")]
    write_lab(tmp_path, "bare", [], phase="building")
    with pytest.raises(observe_cli.ObserveError, match="no nodes yet"):
        observe_cli.lab_servers("bare", tmp_path)
    write_lab(tmp_path, "noagents", [{"name": "node-1"}], agents=False)
    with pytest.raises(observe_cli.ObserveError, match="without agents"):
        observe_cli.lab_servers("noagents", tmp_path)


def test_no_lab_is_said_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AMBIT_LAB", raising=False)
    err = io.StringIO()
    assert observe_cli.main([], out=io.StringIO(), err=err, labs_root=tmp_path / "none") == 2
    assert "no lab found" in err.getvalue() and "--server" in err.getvalue()


# -- fixed flows of two nodes ------------------------------------------------------------------------------------

T0 = int(dt.datetime(2024, 5, 1, 12, 0, 0, tzinfo=dt.UTC).timestamp()) * 1_000_000_000
MS = 1_000_000
CLIENT = Endpoint("10.1.0.7", 41000, "spiffe://cluster.local/ns/shop/sa/client", "shop", "client-1",
                  {"app": "client"}, workload="client")
WEB = Endpoint("10.2.0.8", 8080, "spiffe://cluster.local/ns/shop/sa/web", "shop", "web-0",
               {"app": "web", "version": "v1"}, service="web.shop.svc.cluster.local")
DB = Endpoint("10.2.0.9", 5432, "spiffe://cluster.local/ns/data/sa/db", "data", "db-0", {"app": "db"})
OUTSIDE = Endpoint("192.168.7.1", 55000)
EXTERNAL = Endpoint("93.184.216.34", 443)


def fixed(i: int, node: str, ms: int, verdict: Verdict, event: EventType, direction: Direction,
          reporter: Reporter, src: Endpoint, dst: Endpoint, **kw: object) -> Flow:
    return Flow(T0 + ms * MS, f"00000000-0000-4000-8000-{i:012d}", verdict, event, direction, reporter, node, src,
                dst, **kw)  # type: ignore[arg-type]


def node1() -> list[Flow | LostEvent]:
    n, out = "node-1", Direction.EGRESS
    return [
        fixed(1, n, 100, Verdict.FORWARDED, EventType.KERNEL, out, Reporter.SOURCE, CLIENT, WEB, tcp_flags=SYN,
              summary="TCP Flags: SYN; redirected to the proxy on :15001"),
        fixed(2, n, 101, Verdict.FORWARDED, EventType.START, out, Reporter.SOURCE, CLIENT, WEB, encrypted=True,
              tcp_flags=SYN, summary="opened, mTLS"),
        fixed(3, n, 3601, Verdict.FORWARDED, EventType.END, out, Reporter.SOURCE, CLIENT, WEB, encrypted=True,
              bytes_sent=300, bytes_received=7000, duration_ns=3500 * MS, close_reason="closed by client",
              summary="closed by client; sent 300 B, received 7000 B in 3.500s"),
        fixed(4, n, 4000, Verdict.FORWARDED, EventType.START, out, Reporter.SOURCE, CLIENT, EXTERNAL,
              tcp_flags=SYN, summary="opened, plaintext"),
        fixed(5, n, 4012, Verdict.ERROR, EventType.END, out, Reporter.SOURCE, CLIENT, EXTERNAL,
              drop_reason_desc="connection refused", close_reason="connection refused", duration_ns=12 * MS,
              summary="failed: connection refused; sent 0 B, received 0 B in 0.012s"),
        LostEvent(T0 + 5000 * MS, LostSource.PERF_EVENT_RING_BUFFER, 7),
    ]


def node2() -> list[Flow | LostEvent]:
    n, into = "node-2", Direction.INGRESS
    return [
        fixed(11, n, 150, Verdict.FORWARDED, EventType.START, into, Reporter.DESTINATION, CLIENT, WEB,
              encrypted=True, tcp_flags=SYN, summary="opened, mTLS"),
        fixed(12, n, 2000, Verdict.DROPPED, EventType.DROP, into, Reporter.DESTINATION, OUTSIDE, DB,
              tcp_flags=SYN, drop_reason_desc="denied by AuthorizationPolicy data/deny-external rule 0",
              policy="data/deny-external", summary="denied by AuthorizationPolicy data/deny-external rule 0"),
        fixed(13, n, 2500, Verdict.DROPPED, EventType.KERNEL, into, Reporter.DESTINATION, OUTSIDE, DB,
              tcp_flags=SYN | ACK, drop_reason_desc="no agent listener (agent down), fail-closed",
              summary="dropped in the kernel: no agent listener (agent down), fail-closed"),
        fixed(14, n, 3700, Verdict.FORWARDED, EventType.END, into, Reporter.DESTINATION, CLIENT, WEB,
              encrypted=True, bytes_sent=300, bytes_received=7000, duration_ns=3550 * MS,
              close_reason="closed by client",
              summary="closed by client; sent 300 B, received 7000 B in 3.550s"),
    ]


@pytest.fixture
async def two_nodes(tmp_path: Path, observer_tls: ObserverTlsMaterial
                    ) -> AsyncIterator[tuple[list[FlowRecorder], list[ObserverServer]]]:
    """Two agents' observers, each on a unix socket (addresses[0]) and on mutual-TLS TCP (addresses[1])."""
    recorders, servers = [], []
    for name, entries in (("node-1", node1()), ("node-2", node2())):
        rec = FlowRecorder(name, capacity=64)
        for e in entries:
            rec.ring.write(e)
        server = ObserverServer(rec)
        await server.start(unix_path=str(tmp_path / f"{name}.sock"), tcp="127.0.0.1:0", tls=observer_tls.server_tls())
        recorders.append(rec)
        servers.append(server)
    yield recorders, servers
    for server in servers:
        await server.stop(None)


async def run(argv: list[str]) -> tuple[int, str, str]:
    """observe_cli.main in a thread (it runs its own event loop, as the command does)."""
    out, err = io.StringIO(), io.StringIO()
    rc = await asyncio.to_thread(observe_cli.main, argv, out=out, err=err)
    return rc, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("fmt", ["compact", "dict", "json", "table"])
async def test_golden_output(two_nodes: tuple[list[FlowRecorder], list[ObserverServer]], fmt: str,
                             observer_tls: ObserverTlsMaterial) -> None:
    _recs, servers = two_nodes
    rc, out, err = await run(["--server", servers[0].addresses[0], "--server", servers[1].addresses[1],
                              "--all", "--utc", "-o", fmt, *observer_tls.observe_args()])
    assert (rc, err) == (0, "")
    golden = GOLDEN / f"observe_{fmt}.txt"
    if UPDATE:
        golden.write_text(out)
    assert out == golden.read_text(), f"differs from {golden} (AMBIT_UPDATE_GOLDEN=1 rewrites it)"


async def test_merged_in_time_order_and_trimmed(two_nodes: tuple[list[FlowRecorder], list[ObserverServer]],
                                               observer_tls: ObserverTlsMaterial) -> None:
    _recs, servers = two_nodes
    rc, out, _ = await run(["--server", servers[0].addresses[1], "--server", servers[1].addresses[0],
                            "--last", "3", "-o", "json", *observer_tls.observe_args()])
    lines = [json.loads(line) for line in out.splitlines()]
    assert rc == 0
    assert [(x["node_name"], x.get("flow", {}).get("uuid", "lost")[-2:]) for x in lines] == \
        [("node-2", "14"), ("node-1", "04"), ("node-1", "05"), ("node-1", "st")]  # (and the lost events after)
    rc, out, _ = await run(["--server", servers[0].addresses[1], "--server", servers[1].addresses[0],
                            "--first", "2", "-o", "json", "--verdict", "FORWARDED", "--not", "-t", "kernel",
                            *observer_tls.observe_args()])
    assert [json.loads(line)["flow"]["uuid"][-2:] for line in out.splitlines()] == ["02", "11"]


async def test_filters_reach_the_agents(two_nodes: tuple[list[FlowRecorder], list[ObserverServer]]) -> None:
    _recs, servers = two_nodes
    argv = ["--server", servers[0].addresses[0], "--server", servers[1].addresses[0], "--all", "-o", "json"]
    rc, out, _ = await run([*argv, "--to-namespace", "data"])
    flows = [json.loads(line)["flow"] for line in out.splitlines() if "flow" in json.loads(line)]
    assert rc == 0 and [f["verdict"] for f in flows] == ["DROPPED", "DROPPED"]
    assert flows[0]["drop_reason_desc"] == "denied by AuthorizationPolicy data/deny-external rule 0"
    assert flows[0]["policy"] == "data/deny-external"
    rc, out, _ = await run([*argv, "-n", "shop", "--not", "--pod", "client-1", "-o", "compact"])
    assert rc == 0 and [line for line in out.splitlines() if "->" in line] == []  # every shop flow has client-1


async def test_unreachable_agent_is_reported_and_others_still_printed(
        two_nodes: tuple[list[FlowRecorder], list[ObserverServer]], tmp_path: Path) -> None:
    _recs, servers = two_nodes
    rc, out, err = await run(["--server", servers[1].addresses[0], "--server", str(tmp_path / "gone.sock"),
                              "--all", "--utc"])
    assert rc == 1
    assert "gone.sock: UNAVAILABLE (is the agent running there?" in err
    assert len(out.splitlines()) == 4


async def test_follow_prints_history_merged_then_new_flows(
        two_nodes: tuple[list[FlowRecorder], list[ObserverServer]]) -> None:
    recs, servers = two_nodes
    query = observe_cli.query_from_args(observe_cli.parser().parse_args(["-f", "--last", "2", "--to-port", "8080"]))
    out = io.StringIO()
    task = asyncio.create_task(observe_cli.observe([s.addresses[0] for s in servers], query,
                                                   Printer(out, "json"), io.StringIO()))
    for _ in range(200):
        if all(r.ring.followers == 1 for r in recs) and out.getvalue().count("\n") >= 3:
            break
        await asyncio.sleep(0.01)
    history = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [h["flow"]["uuid"][-2:] for h in history[:2]] == ["03", "14"]  # the last 2 to port 8080, time order
    assert history[2]["lost_events"]["num_events_lost"] == "7"  # lost events are never filtered away
    recs[1].start(direction="INGRESS", reporter="destination", source=CLIENT, destination=DB, mtls=True)
    recs[0].start(direction="EGRESS", reporter="source", source=CLIENT, destination=WEB, mtls=True)
    for _ in range(200):
        if out.getvalue().count("\n") >= 4:
            break
        await asyncio.sleep(0.01)
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 and json.loads(lines[3])["flow"]["destination"]["pod_name"] == "web-0"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_ambit_observe_command(two_nodes: tuple[list[FlowRecorder], list[ObserverServer]],
                                    observer_tls: ObserverTlsMaterial) -> None:
    """The real command, as a user runs it (the operator's certificate from the environment)."""
    _recs, servers = two_nodes
    op = observer_tls.operator
    env = {**os.environ, "AMBIT_TLS_CLIENT_CERT_FILE": str(op.cert), "AMBIT_TLS_CLIENT_KEY_FILE": str(op.key),
           "AMBIT_TLS_CA_CERT_FILES": ",".join(map(str, op.cas))}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent.cli", "observe", "--server", servers[0].addresses[0],
        "--server", servers[1].addresses[1], "--verdict", "DROPPED", "-o", "json",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, env=env)
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, stderr.decode()
    responses = [json.loads(line) for line in stdout.decode().splitlines()]
    assert [r["flow"]["uuid"][-2:] for r in responses if "flow" in r] == ["12", "13"]
    assert all(r["flow"]["verdict"] == "DROPPED" for r in responses if "flow" in r)
    assert responses[-1]["lost_events"] == {"source": "PERF_EVENT_RING_BUFFER", "num_events_lost": "7"}


async def test_ipv6_flows_from_an_observer_on_ipv6(tmp_path: Path, observer_tls: ObserverTlsMaterial) -> None:
    """An Observer on [::1] (mutual TLS), flows between IPv6 addresses: an address outside the mesh prints as
    [v6]:port, and --from-ip takes IPv6 addresses and CIDRs."""
    client6 = Endpoint("fd00:200::10", 41000, "spiffe://cluster.local/ns/shop/sa/client", "shop", "client-1",
                       {"app": "client"})
    db6 = Endpoint("fd00:200:1::11", 5432, "spiffe://cluster.local/ns/data/sa/db", "data", "db-0", {"app": "db"})
    outside6, external6 = Endpoint("fd00:192:168::99", 55000), Endpoint("2001:db8::7", 443)
    rec = FlowRecorder("node-1", capacity=8)
    for flow in (fixed(21, "node-1", 100, Verdict.FORWARDED, EventType.START, Direction.EGRESS, Reporter.SOURCE,
                       client6, external6, tcp_flags=SYN, summary="opened, plaintext"),
                 fixed(22, "node-1", 200, Verdict.DROPPED, EventType.DROP, Direction.INGRESS, Reporter.DESTINATION,
                       outside6, db6, tcp_flags=SYN, summary="denied by PeerAuthentication data/strict")):
        rec.ring.write(flow)
    server = ObserverServer(rec)
    await server.start(tcp="[::1]:0", tls=observer_tls.server_tls())
    try:
        [address] = server.addresses
        assert address == f"[::1]:{server.tcp_port}"
        argv = ["--server", address, "--all", "--utc", *observer_tls.observe_args()]
        rc, out, err = await run([*argv, "-o", "compact"])
        assert (rc, err) == (0, "")
        assert out.splitlines() == [
            "May  1 12:00:00.100 [node-1]: shop/client-1:41000 (sa:client) -> [2001:db8::7]:443 start EGRESS "
            "FORWARDED (opened, plaintext)",
            "May  1 12:00:00.200 [node-1]: [fd00:192:168::99]:55000 -> data/db-0:5432 (sa:db) drop INGRESS "
            "DROPPED (denied by PeerAuthentication data/strict)"]
        for selector, expected in ((["--from-ip", "fd00:200::/48"], ["21"]),
                                   (["--from-ip", "fd00:192:168::99"], ["22"]),
                                   (["--to-ip", "fd00:200:1:0::11"], ["22"]), (["--from-ip", "10.0.0.0/8"], [])):
            rc, out, _ = await run([*argv, *selector, "-o", "json"])
            flows = [json.loads(line)["flow"] for line in out.splitlines()]
            assert rc == 0 and [f["uuid"][-2:] for f in flows] == expected, selector
            assert all(f["ip"]["ipVersion"] == "IPv6" for f in flows)
    finally:
        await server.stop(None)


def test_printer_colour_and_table_after_flush() -> None:
    responses = [pb.GetFlowsResponse(flow=f.to_proto(), node_name=f.node_name, time=f.to_proto().time)
                 for f in node2() if isinstance(f, Flow)]
    out = io.StringIO()
    Printer(out, "compact", color=True, tz=dt.UTC).write_all(responses)
    assert "\x1b[31mDROPPED\x1b[0m" in out.getvalue() and "\x1b[32mFORWARDED\x1b[0m" in out.getvalue()
    out = io.StringIO()
    table = Printer(out, "table", tz=dt.UTC)
    table.write_all(responses[:1])  # the buffered part settles the columns
    table.write(responses[1])  # later rows (follow) print at once
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and lines[0].startswith("TIMESTAMP") and "DROPPED" in lines[2]
    assert lines[0].index("NODE") == lines[1].index("node-2") == lines[2].index("node-2")
    with pytest.raises(ValueError, match="unknown output format"):
        Printer(out, "yaml")  # type: ignore[arg-type]
