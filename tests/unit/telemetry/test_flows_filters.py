"""Flow filters, table-driven: each field, AND within a filter, OR across filters, allow minus deny."""

from __future__ import annotations

from typing import Any

import pytest

from agent.telemetry import observer_pb2 as pb
from agent.telemetry.filters import FilterError, build, build_request
from agent.telemetry.model import Direction, Endpoint, EventType, Flow, Reporter, Verdict

WEB = Endpoint("10.1.0.5", 8080, "spiffe://cluster.local/ns/shop/sa/web", "shop", "web-7d9f-abc",
               {"app": "web", "tier": "front"})
DB = Endpoint("10.2.0.9", 5432, "spiffe://cluster.local/ns/data/sa/postgres", "data", "db-0", {"app": "db"})
CLIENT = Endpoint("10.1.0.7", 41000, "spiffe://cluster.local/ns/shop/sa/client", "shop", "client-1",
                  {"app": "client"})
OUTSIDE = Endpoint("192.168.7.1", 55000)


def mk(name: str, src: Endpoint, dst: Endpoint, *, verdict: Verdict = Verdict.FORWARDED,
       event: EventType = EventType.START, direction: Direction = Direction.EGRESS, node: str = "node-1") -> Flow:
    return Flow(1, name, verdict, event, direction, Reporter.SOURCE, node, src, dst)


FLOWS = [
    mk("client->web", CLIENT, WEB),
    mk("web->db", WEB, DB, node="node-2"),
    mk("web->db denied", WEB, DB, verdict=Verdict.DROPPED, event=EventType.DROP, direction=Direction.INGRESS,
       node="node-2"),
    mk("outside->web", OUTSIDE, WEB, direction=Direction.INGRESS),
    mk("client->web failed", CLIENT, WEB, verdict=Verdict.ERROR, event=EventType.END),
]
ALL = {f.uuid for f in FLOWS}


def f(**fields: Any) -> pb.FlowFilter:
    return pb.FlowFilter(**fields)


CASES: list[tuple[str, list[pb.FlowFilter], list[pb.FlowFilter], set[str]]] = [
    ("no filters: everything", [], [], ALL),
    ("empty filter matches all", [f()], [], ALL),
    ("source ip", [f(source_ip=["10.1.0.7"])], [], {"client->web", "client->web failed"}),
    ("destination cidr", [f(destination_ip=["10.2.0.0/16"])], [], {"web->db", "web->db denied"}),
    ("ip values OR", [f(source_ip=["10.1.0.7", "192.168.7.1"])], [],
     {"client->web", "client->web failed", "outside->web"}),
    ("pod prefix with namespace", [f(source_pod=["shop/web"])], [], {"web->db", "web->db denied"}),
    ("pod in any namespace", [f(destination_pod=["/db-"])], [], {"web->db", "web->db denied"}),
    ("namespace prefix form", [f(destination_pod=["data/"])], [], {"web->db", "web->db denied"}),
    ("address-only endpoints never match pods", [f(source_pod=["/"])], [],
     ALL - {"outside->web"}),
    ("namespace exact", [f(source_namespace=["shop"])], [],
     {"client->web", "client->web failed", "web->db", "web->db denied"}),
    ("label k=v", [f(destination_label=["app=web"])], [], {"client->web", "outside->web", "client->web failed"}),
    ("label presence and AND within a selector", [f(source_label=["tier,app=web"])], [],
     {"web->db", "web->db denied"}),
    ("label selectors OR", [f(source_label=["app=client", "app=nope"])], [], {"client->web", "client->web failed"}),
    ("identity exact", [f(destination_identity=["spiffe://cluster.local/ns/data/sa/postgres"])], [],
     {"web->db", "web->db denied"}),
    ("identity prefix", [f(source_identity=["spiffe://cluster.local/ns/shop/*"])], [],
     {"client->web", "client->web failed", "web->db", "web->db denied"}),
    ("identity suffix", [f(source_identity=["sa/web"])], [], {"web->db", "web->db denied"}),
    ("no identity never matches", [f(source_identity=["*"])], [], ALL - {"outside->web"}),
    ("port", [f(destination_port=[5432])], [], {"web->db", "web->db denied"}),
    ("verdict", [f(verdict=[pb.DROPPED, pb.ERROR])], [], {"web->db denied", "client->web failed"}),
    ("protocol", [f(protocol=["TCP"])], [], ALL),
    ("other protocol", [f(protocol=["udp"])], [], set()),
    ("direction", [f(traffic_direction=[pb.INGRESS])], [], {"web->db denied", "outside->web"}),
    ("event type", [f(event_type=[pb.END])], [], {"client->web failed"}),
    ("node pattern", [f(node_name=["node-[2-9]"])], [], {"web->db", "web->db denied"}),
    ("uuid", [f(uuid=["outside->web"])], [], {"outside->web"}),
    ("AND within one filter", [f(source_namespace=["shop"], verdict=[pb.FORWARDED])], [],
     {"client->web", "web->db"}),
    ("OR across filters", [f(source_ip=["192.168.7.1"]), f(event_type=[pb.DROP])], [],
     {"outside->web", "web->db denied"}),
    ("blacklist only", [], [f(destination_namespace=["data"])], {"client->web", "outside->web", "client->web failed"}),
    ("whitelist minus blacklist", [f(destination_pod=["shop/web"])],
     [f(verdict=[pb.ERROR]), f(source_ip=["192.168.0.0/16"])], {"client->web"}),
]


@pytest.mark.parametrize(("whitelist", "blacklist", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_filters(whitelist: list[pb.FlowFilter], blacklist: list[pb.FlowFilter], expected: set[str]) -> None:
    predicate = build_request(whitelist, blacklist)
    assert {fl.uuid for fl in FLOWS if predicate(fl)} == expected


@pytest.mark.parametrize("bad", [f(source_ip=["10.0.0.300"]), f(destination_ip=["nope/8"]),
                                 f(source_label=["=v"]), f(destination_identity=[""])])
def test_bad_values_are_refused_when_built(bad: pb.FlowFilter) -> None:
    with pytest.raises(FilterError):
        build(bad)
