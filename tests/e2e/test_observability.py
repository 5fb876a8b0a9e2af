"""Issue 5 end to end, on a real `ambit lab`: the flows `ambit observe` returns for real connections between
pods, the agents' Prometheus metrics, the lost-events report of a full ring, and `ambit status`.

Layout: 2 nodes, 3 pods each; ``app-i-1`` and ``app-i-3`` in ``front``, ``app-i-2`` in ``back``; both namespaces
enrolled for the whole module, each pod with its own service account (so its own SPIFFE identity). Every pod
runs a byte server on 7070 (the client sends a 16-byte header and exactly the bytes it announced, the server
answers exactly the bytes asked and closes: the counts each way are known to the byte). One policy is in force
throughout: ``back/deny-app-1-3`` denies front/app-1-3 on back/app-2-2. The agents keep a small flow ring
(``--flows``) so that the last test can overflow it. Tests read what they made: flows by the client's port or
since the test began, metric series by pod pairs no other test uses.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from agent.lab import state as lab_state
from agent.lab.runtime import PodInfo
from tests.fixtures import lab_helpers as h
from tests.fixtures import lab_observe as o
from tests.fixtures.eventually import eventually_sync
from tests.fixtures.lab_observe import ByteServer, Exchange

pytestmark = o.lab_marks()

FRONT, BACK = "front", "back"
PORT = 7070
RING = 300  # flows each agent keeps (--flows)
DENY_POLICY = "AuthorizationPolicy back/deny-app-1-3"
Flow = dict[str, Any]


@dataclass
class ObsLab(o.RunningLab):
    servers: dict[str, ByteServer] = field(default_factory=dict)


    def exchange(self, src: str, dst: str, request: int, reply: int) -> Exchange:
        return o.byte_exchange(self.pod(src), self.pod(dst), PORT, request, reply)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ObsLab]:
    with h.running_lab("obs", nodes=2, pods=3, namespaces=(FRONT, BACK),
                       agent_flags=["--flows", str(RING)]) as (info, paths):
        lab = ObsLab(info, paths)
        try:
            for p in info.pods:
                lab.servers[p.name] = ByteServer(p, PORT).start()
            h.set_namespace_label(paths, FRONT, "ambient")
            h.set_namespace_label(paths, BACK, "ambient")
            res = o.lab_apply(lab.name, tmp_path_factory.mktemp("obs"), f"""\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-app-1-3
  namespace: back
spec:
  selector:
    matchLabels:
      app: app-2-2
  action: DENY
  rules:
  - from:
    - source:
        principals: ["{o.principal(lab.pod("app-1-3"))}"]
""")
            assert res.returncode == 0, res.stderr
            o.wait_agents(paths, lab.nodes, policies=[DENY_POLICY],
                          captured={n.name: {p.ip for p in info.pods if p.node == n.name} for n in info.nodes})
            yield lab
        finally:
            for server in lab.servers.values():
                server.close()


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


# -- flow checks ------------------------------------------------------------------------------------------------------
def endpoint_of(flow: Mapping[str, Any], side: str) -> tuple[str, str, str]:
    ep = flow.get(side, {})
    return ep.get("namespace", ""), ep.get("pod_name", ""), ep.get("identity", "")


def expected_endpoint(p: PodInfo) -> tuple[str, str, str]:
    return p.namespace, p.name, o.identity(p)


def of_connection(responses: Sequence[Mapping[str, Any]], src: PodInfo, local_port: int) -> list[Flow]:
    """The proxies' flows (start, end, drop) of one connection: its client's address and port."""
    return [f for f in o.flows(responses) if f.get("event_type") in ("START", "END", "DROP")
            and f["ip"]["source"] == src.ip and o.tcp(f).get("source_port") == local_port]


def by_reporter(flows: Sequence[Flow]) -> dict[tuple[str, str, str], Flow]:
    """(node, reporter, event type) -> the flow; each at most once."""
    out: dict[tuple[str, str, str], Flow] = {}
    for f in flows:
        key = (f["node_name"], f["reporter"], f["event_type"])
        assert key not in out, f"two {key} flows for one connection: {out[key]} and {f}"
        out[key] = f
    return out


def assert_connection_flows(flows: Sequence[Flow], src: PodInfo, dst: PodInfo, ex: Exchange) -> None:
    """START and END from the source's agent (EGRESS) and the destination's (INGRESS), each naming both pods with
    their identities, FORWARDED, encrypted, and the END carrying the bytes each way."""
    got = by_reporter(flows)
    wanted = {(src.node, "SOURCE", "START"), (src.node, "SOURCE", "END"),
              (dst.node, "DESTINATION", "START"), (dst.node, "DESTINATION", "END")}
    assert set(got) == wanted, f"flows of {src.key}:{ex.local[1]} -> {dst.key}: {sorted(got)}, wanted {sorted(wanted)}"
    for (node, reporter, event), f in got.items():
        what = f"{node} {reporter} {event}"
        assert f["verdict"] == "FORWARDED", what
        assert f["traffic_direction"] == ("EGRESS" if reporter == "SOURCE" else "INGRESS"), what
        assert f["ip"] == {"source": src.ip, "destination": dst.ip, "ipVersion": "IPv4", "encrypted": True}, what
        assert o.tcp(f)["source_port"] == ex.local[1] and o.tcp(f)["destination_port"] == PORT, what
        assert endpoint_of(f, "source") == expected_endpoint(src), what
        assert endpoint_of(f, "destination") == expected_endpoint(dst), what
        assert f["source"]["labels"] == [f"app={src.name}"] and f["destination"]["labels"] == [f"app={dst.name}"]
        if event == "END":
            assert (int(f.get("bytes_sent", 0)), int(f.get("bytes_received", 0))) == (ex.sent, ex.received), \
                f"{what}: bytes sent/received {f.get('bytes_sent')}/{f.get('bytes_received')}, " \
                f"the client sent {ex.sent} and received {ex.received}"
            assert f.get("close_reason") == "closed", what


def wait_flows(lab: ObsLab, query: Sequence[str], ready: Callable[[list[dict[str, Any]]], bool],
               what: str, timeout: float = 15.0) -> list[dict[str, Any]]:
    """Ask `ambit observe` until ``ready`` holds for its answer."""
    last: list[list[dict[str, Any]]] = [[]]

    def check() -> bool:
        last[0] = o.observe(lab.name, *query)
        return ready(last[0])

    try:
        eventually_sync(check, what, timeout, interval=0.2)
    except AssertionError as e:
        raise AssertionError(f"{e}; last answer: {last[0]}") from None
    return last[0]


# -- flows ------------------------------------------------------------------------------------------------------------
def test_flows_name_both_pods_with_identities_and_count_the_bytes_each_way(lab: ObsLab) -> None:
    client, same_node, server = lab.pod("app-1-1"), lab.pod("app-2-1"), lab.pod("app-2-2")
    across = lab.exchange("app-1-1", "app-2-2", 200_000, 30_001)  # node-1 -> node-2, over HBONE
    local = lab.exchange("app-2-1", "app-2-2", 70_000, 9_999)  # on node-2

    def complete(responses: list[dict[str, Any]]) -> bool:
        return (len([f for f in of_connection(responses, client, across.local[1]) if f["event_type"] == "END"]) == 2
                and len([f for f in of_connection(responses, same_node, local.local[1])
                         if f["event_type"] == "END"]) == 2)

    responses = wait_flows(lab, ["--all", "--to-pod", f"{BACK}/app-2-2"], complete, "END flows of both connections")
    assert_connection_flows(of_connection(responses, client, across.local[1]), client, server, across)
    assert_connection_flows(of_connection(responses, same_node, local.local[1]), same_node, server, local)
    # the kernel saw the client's SYN on its way to the proxy, and said so
    kernel = [f for f in o.flows(responses) if f.get("event_type") == "KERNEL" and f["node_name"] == "node-1"
              and o.tcp(f).get("source_port") == across.local[1]]
    assert any(o.tcp(f).get("flags", {}).get("SYN") for f in kernel), kernel


def test_denied_connection_is_dropped_naming_the_policy_on_both_nodes(lab: ObsLab) -> None:
    since = now_rfc3339()
    denied, server = lab.pod("app-1-3"), lab.pod("app-2-2")
    a = o.byte_attempt(denied, server, PORT)
    assert a.refused, a

    def both(responses: list[dict[str, Any]]) -> bool:
        return {f["node_name"] for f in o.flows(responses) if f.get("event_type") == "DROP"} == {"node-1", "node-2"}

    responses = wait_flows(lab, ["--since", since, "--verdict", "DROPPED", "--from-pod", f"{FRONT}/app-1-3"], both,
                           "DROPPED flows on both nodes")
    drops = by_reporter([f for f in o.flows(responses) if f.get("event_type") == "DROP"])
    assert set(drops) == {("node-2", "DESTINATION", "DROP"), ("node-1", "SOURCE", "DROP")}, drops
    at_dst, at_src = drops[("node-2", "DESTINATION", "DROP")], drops[("node-1", "SOURCE", "DROP")]
    assert at_dst["drop_reason_desc"] == f"denied by {DENY_POLICY} rule 0", at_dst
    assert at_dst["policy"] == DENY_POLICY, at_dst
    assert at_dst["traffic_direction"] == "INGRESS" and at_src["traffic_direction"] == "EGRESS"
    assert "denied by the destination" in at_src["drop_reason_desc"], at_src
    for f in (at_dst, at_src):
        assert f["verdict"] == "DROPPED"
        assert f["ip"]["source"] == denied.ip and f["ip"]["destination"] == server.ip and f["ip"]["encrypted"]
        assert endpoint_of(f, "source") == expected_endpoint(denied)
        assert endpoint_of(f, "destination") == expected_endpoint(server)
        assert o.tcp(f)["destination_port"] == PORT
        if a.local is not None:
            assert o.tcp(f)["source_port"] == a.local[1]


# -- filters ----------------------------------------------------------------------------------------------------------
def _pod_is(ep: Mapping[str, Any], ns: str, prefix: str) -> bool:
    return ep.get("namespace") == ns and str(ep.get("pod_name", "")).startswith(prefix)


FILTERS: list[tuple[list[str], Callable[[Flow], bool]]] = [
    (["--verdict", "DROPPED"], lambda f: f["verdict"] == "DROPPED"),
    (["--from-pod", f"{FRONT}/app-1-1", "--to-pod", f"{BACK}/app-2-2"],
     lambda f: _pod_is(f.get("source", {}), FRONT, "app-1-1") and _pod_is(f.get("destination", {}), BACK, "app-2-2")),
    (["--namespace", BACK],
     lambda f: BACK in (f.get("source", {}).get("namespace"), f.get("destination", {}).get("namespace"))),
    (["--to-pod", f"{BACK}/app-2-2", "--not", "--from-namespace", FRONT],
     lambda f: _pod_is(f.get("destination", {}), BACK, "app-2-2") and f.get("source", {}).get("namespace") != FRONT),
    (["--not", "--verdict", "FORWARDED"], lambda f: f["verdict"] != "FORWARDED"),
    (["--from-namespace", FRONT, "--to-namespace", FRONT, "--node-name", "node-1"],
     lambda f: f.get("source", {}).get("namespace") == FRONT and f.get("destination", {}).get("namespace") == FRONT
     and f["node_name"] == "node-1"),
]


def test_filters_return_exactly_the_flows_they_describe(lab: ObsLab) -> None:
    lab.exchange("app-1-1", "app-2-2", 1000, 100)  # front -> back across nodes
    lab.exchange("app-2-1", "app-2-2", 1000, 100)  # front -> back on node-2
    lab.exchange("app-1-2", "app-2-2", 1000, 100)  # back -> back
    lab.exchange("app-2-2", "app-1-1", 1000, 100)  # back -> front
    lab.exchange("app-2-3", "app-1-3", 1000, 100)  # front -> front
    assert o.byte_attempt(lab.pod("app-1-3"), lab.pod("app-2-2"), PORT).refused
    time.sleep(0.3)  # let the last END flows land before the cut
    until = now_rfc3339()
    window = ["--all", "--until", until]
    answers = o.observe_many(lab.name, [window] + [[*window, *args] for args, _ in FILTERS])
    everything = o.flows(answers[0])
    assert len(everything) > 20
    for (args, matches), answer in zip(FILTERS, answers[1:], strict=True):
        got = [f["uuid"] for f in o.flows(answer)]
        wanted = [f["uuid"] for f in everything if matches(f)]
        assert wanted, f"nothing in the window for {args}: the check would prove nothing"
        assert len(wanted) < len(everything), f"{args} selects everything: the check would prove nothing"
        assert sorted(got) == sorted(wanted), \
            f"ambit observe {' '.join(args)}: {len(got)} flows, {len(wanted)} expected; " \
            f"extra {set(got) - set(wanted)}, missing {set(wanted) - set(got)}"


def test_follow_delivers_a_flow_made_after_it_started(lab: ObsLab) -> None:
    src, dst = lab.pod("app-2-1"), lab.pod("app-1-1")
    lab.exchange("app-2-1", "app-1-1", 100, 100)  # something for --last 1 to print first
    follower = o.Follower(lab.name, "--last", "1", "--from-pod", f"{FRONT}/app-2-1", limit=60)
    try:
        eventually_sync(lambda: len(follower.seen()) >= 1 or follower.proc.poll() is not None,
                        "ambit observe -f printing the buffered flow", 20)
        assert follower.proc.poll() is None, f"ambit observe -f exited: {follower.stop()}"
        history = follower.seen()
        ex = lab.exchange("app-2-1", "app-1-1", 5000, 500)

        def arrived() -> bool:
            ends = [f for f in of_connection(follower.seen(), src, ex.local[1]) if f["event_type"] == "END"]
            return len(ends) == 2

        eventually_sync(arrived, "the new connection's END flows from both agents, followed", 10)
        assert not of_connection(history, src, ex.local[1])
        assert_connection_flows(of_connection(follower.seen(), src, ex.local[1]), src, dst, ex)
        assert follower.proc.poll() is None, "ambit observe -f stopped following"
    finally:
        err = follower.stop()
    assert "Traceback" not in err, err


# -- metrics ----------------------------------------------------------------------------------------------------------
TCP_FAMILIES = ("istio_tcp_connections_opened", "istio_tcp_connections_closed", "istio_tcp_sent_bytes",
                "istio_tcp_received_bytes", "istio_tcp_connections_failed")


def series(samples: Sequence[o.Sample], name: str, **labels: str) -> list[o.Sample]:
    return [s for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]


def one_value(samples: Sequence[o.Sample], name: str, **labels: str) -> float | None:
    found = series(samples, name, **labels)
    assert len(found) <= 1, f"several {name} series for {labels}: {found}"
    return found[0].value if found else None


def test_metrics_carry_istio_and_hubble_families_with_their_labels(lab: ObsLab) -> None:
    src, dst = lab.pod("app-2-3"), lab.pod("app-1-1")  # a pair no other test connects
    exchanges = [lab.exchange("app-2-3", "app-1-1", 50_000, 7_777) for _ in range(3)]
    assert o.byte_attempt(lab.pod("app-1-3"), lab.pod("app-2-2"), PORT).refused
    pair = {"source_workload": src.name, "destination_workload": dst.name,
            "source_workload_namespace": FRONT, "destination_workload_namespace": FRONT,
            "source_principal": o.identity(src), "destination_principal": o.identity(dst),
            "source_app": src.name, "destination_app": dst.name,
            "connection_security_policy": "mutual_tls", "request_protocol": "tcp", "response_flags": "-"}
    scraped: dict[str, list[o.Sample]] = {}

    def all_closed() -> bool:
        for node, reporter in ((src.node, "source"), (dst.node, "destination")):
            names, samples = o.scrape(lab.paths, node)
            scraped[node] = samples
            for family in ("istio_tcp_connections_opened", "istio_tcp_connections_closed", "istio_tcp_sent_bytes",
                           "istio_tcp_received_bytes", "hubble_flows_processed", "hubble_drop"):
                assert family in names, f"{node}: no {family} family in /metrics"
            if one_value(samples, "istio_tcp_connections_closed_total", reporter=reporter, **pair) != len(exchanges):
                return False
        return True

    eventually_sync(all_closed, "the three connections closed in both agents' metrics", 10, interval=0.1)
    for node, reporter in ((src.node, "source"), (dst.node, "destination")):
        samples = scraped[node]
        where = f"{node} (reporter={reporter})"
        assert one_value(samples, "istio_tcp_connections_opened_total", reporter=reporter, **pair) == 3, where
        # Istio: received = request bytes (source -> destination), sent = response bytes
        assert one_value(samples, "istio_tcp_received_bytes_total", reporter=reporter, **pair) == \
            sum(e.sent for e in exchanges), where
        assert one_value(samples, "istio_tcp_sent_bytes_total", reporter=reporter, **pair) == \
            sum(e.received for e in exchanges), where
        assert series(samples, "hubble_flows_processed_total", type="Trace", subtype="end", verdict="FORWARDED"), where
    at_server = scraped["node-2"] if lab.pod("app-2-2").node == "node-2" else scraped["node-1"]
    assert (one_value(at_server, "hubble_drop_total", reason="POLICY_DENIED", protocol="TCP") or 0) >= 1
    assert series(at_server, "hubble_flows_processed_total", type="Drop", subtype="drop", verdict="DROPPED")
    denied = series(at_server, "istio_tcp_connections_failed_total", reporter="destination", response_flags="DENY",
                    source_workload="app-1-3", destination_workload="app-2-2")
    assert denied and denied[0].value >= 1, "the denial is not counted as a failed connection with DENY"


def test_series_of_a_deleted_pod_disappear(lab: ObsLab) -> None:
    doomed = lab.pod("app-1-2")
    lab.exchange("app-1-2", "app-2-2", 1000, 100)  # the doomed pod as a source
    lab.exchange("app-2-1", "app-1-2", 1000, 100)  # and as a destination
    lab.exchange("app-1-1", "app-2-2", 1000, 100)  # a pair that stays

    def naming(samples: Sequence[o.Sample]) -> list[o.Sample]:
        return [s for s in samples if s.name.startswith("istio_tcp_")
                and doomed.name in (s.labels.get("source_workload"), s.labels.get("destination_workload"))]

    def closed_everywhere() -> bool:
        return all(len([s for s in naming(o.scrape(lab.paths, n)[1])
                        if s.name == "istio_tcp_connections_closed_total"]) == 2 for n in lab.nodes)

    eventually_sync(closed_everywhere, f"series naming {doomed.key} on both agents", 10, interval=0.1)
    started = time.monotonic()
    with lab_state.edit(lab.paths.state) as st:
        st.remove("Pod", doomed.namespace, doomed.name)
    eventually_sync(lambda: all(not naming(o.scrape(lab.paths, n)[1]) for n in lab.nodes),
                    f"the series of deleted {doomed.key} gone from /metrics", 5, interval=0.05)
    gone_after = time.monotonic() - started
    for node in lab.nodes:
        kept = series(o.scrape(lab.paths, node)[1], "istio_tcp_connections_closed_total",
                      source_workload="app-1-1", destination_workload="app-2-2")
        assert kept, f"{node}: the series of pods that still exist went too"
    print(f"\nseries of a deleted pod gone from /metrics in {gone_after * 1000:.0f} ms")


# -- status -----------------------------------------------------------------------------------------------------------
def test_status_shows_enrolled_pods_certificates_and_policies(lab: ObsLab) -> None:
    out = o.ambit_ok("status", "--lab", lab.name)
    blocks = {m.group(1): m.group(0) for m in re.finditer(r"^(node-\d+): .*?(?=^node-|\Z)", out, re.M | re.S)}
    assert sorted(blocks) == lab.nodes, out
    in_state = {(p["metadata"]["namespace"], p["metadata"]["name"])
                for p in lab_state.LabObjects.load(lab.paths.state).of_kind("Pod")}
    for node, block in blocks.items():
        assert block.startswith(f"{node}: ready;"), block
        local = [p for p in lab.info.pods if p.node == node and (p.namespace, p.name) in in_state]
        assert local, block
        for p in local:
            assert f"{p.key} ({p.ip})" in block.split("enrolled pods:")[1].splitlines()[0], block
            assert re.search(rf"certificate: +{re.escape(o.identity(p))}: available, expires ", block), block
        others = [p for p in lab.info.pods if p.node != node]
        assert not any(f"{o.identity(p)}:" in block for p in others), f"{node} shows another node's certificate"
        assert f"policies:      {DENY_POLICY}" in block, block


# -- a full ring -------------------------------------------------------------------------------------------------------
def test_a_full_ring_reports_lost_events(lab: ObsLab) -> None:
    node = lab.pod("app-2-2").node
    before = o.server_status(lab.paths, node)
    assert before.max_flows == RING
    deadline = time.monotonic() + 40
    made = 0
    while o.server_status(lab.paths, node).seen_flows - before.seen_flows <= RING + 50:
        assert time.monotonic() < deadline and made < 400, f"only {made} connections in time"
        lab.exchange("app-2-1", "app-2-2", 10, 10)
        made += 1
    time.sleep(0.3)
    low = o.server_status(lab.paths, node)
    compact, as_json = o.ambit_many([["observe", "--lab", lab.name, "--all", "--node-name", node],
                                     ["observe", "--lab", lab.name, "-o", "json", "--last", "100000"]])
    high = o.server_status(lab.paths, node)
    assert compact.returncode == 0 and as_json.returncode == 0, compact.stderr + as_json.stderr
    assert low.num_flows <= RING and low.seen_flows - low.num_flows > 0

    line = next((li for li in compact.stdout.splitlines() if "EVENTS LOST" in li), None)
    assert line is not None, f"no lost-events line in `ambit observe --all`:\n{compact.stdout[:2000]}"
    m = re.search(rf"\[{node}\]: EVENTS LOST: HUBBLE_RING_BUFFER (\d+) \(older flows were overwritten in {node}'s "
                  r"buffer\)", line)
    assert m, line
    evicted = (low.seen_flows - low.num_flows, high.seen_flows - high.num_flows)
    assert evicted[0] <= int(m.group(1)) <= evicted[1], (line, evicted)

    notices = o.lost([json.loads(line) for line in as_json.stdout.splitlines() if line.strip()])
    mine = [r for r in notices if r["node_name"] == node]
    assert mine and mine[0]["lost_events"]["source"] == "HUBBLE_RING_BUFFER", notices
    assert evicted[0] <= int(mine[0]["lost_events"]["num_events_lost"]) <= evicted[1], (mine, evicted)
    print(f"\n{made} connections: {high.seen_flows - before.seen_flows} flows into a ring of {RING} on {node}; "
          f"reported lost: {m.group(1)}")
