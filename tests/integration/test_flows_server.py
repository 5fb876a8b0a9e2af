"""The Observer gRPC service with a real client, over a unix socket and mutual-TLS TCP (the operator's
certificate): number/first/since/until, filters, follow, lost events, ServerStatus, argument errors."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest

from agent.telemetry import observer_pb2 as pb
from agent.telemetry import observer_pb2_grpc as pb_grpc
from agent.telemetry.model import Endpoint, timestamp
from agent.telemetry.observer import ObserverServer
from agent.telemetry.observer_tls import ClientTlsFiles
from agent.telemetry.recorder import FlowRecorder
from tests.conftest import ObserverTlsMaterial

A = Endpoint("10.1.0.7", 41000, "spiffe://cluster.local/ns/shop/sa/client", "shop", "client-1", {"app": "client"})
B = Endpoint("10.2.0.9", 5432, "spiffe://cluster.local/ns/data/sa/db", "data", "db-0", {"app": "db"})
T0 = 1_700_000_000_000_000_000
STEP = 1_000_000_000


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        self.now += STEP
        return self.now


OPERATOR: ClientTlsFiles | None = None  # set by the fixture: the TCP address is dialled with it


@pytest.fixture
async def served(tmp_path: Path, observer_tls: ObserverTlsMaterial) -> AsyncIterator[tuple[FlowRecorder,
                                                                                          ObserverServer]]:
    global OPERATOR
    OPERATOR = observer_tls.operator
    rec = FlowRecorder("node-1", capacity=10, clock=Clock())
    server = ObserverServer(rec, follower_queue=5)
    await server.start(unix_path=str(tmp_path / "obs" / "observer.sock"), tcp="127.0.0.1:0",
                       tls=observer_tls.server_tls())
    yield rec, server
    await server.stop(None)


def record(rec: FlowRecorder, n: int, port: int = 5432) -> None:
    for i in range(n):
        dst = Endpoint(B.ip, port, B.identity, B.namespace, B.pod_name, B.labels)
        rec.start(direction="EGRESS", reporter="source", source=A, destination=dst, mtls=i % 2 == 0)


def stub(address: str) -> tuple[grpc.aio.Channel, pb_grpc.ObserverStub]:
    if address.startswith("/"):
        channel = grpc.aio.insecure_channel(f"unix:{address}")
    else:
        assert OPERATOR is not None
        channel = grpc.aio.secure_channel(address, OPERATOR.credentials(), options=OPERATOR.options())
    return channel, pb_grpc.ObserverStub(channel)  # type: ignore[no-untyped-call]


async def get(address: str, **req: object) -> list[pb.GetFlowsResponse]:
    channel, s = stub(address)
    async with channel:
        return [r async for r in s.GetFlows(pb.GetFlowsRequest(**req), timeout=5)]  # type: ignore[arg-type]


def ports(responses: list[pb.GetFlowsResponse]) -> list[int]:
    return [r.flow.l4.tcp.source_port for r in responses if r.HasField("flow")]


def kinds(responses: list[pb.GetFlowsResponse]) -> list[str]:
    return [str(r.WhichOneof("response_types")) for r in responses]


@pytest.mark.parametrize("transport", ["unix", "tcp"])
async def test_last_and_first(served: tuple[FlowRecorder, ObserverServer], transport: str) -> None:
    rec, server = served
    address = server.addresses[0 if transport == "unix" else 1]
    record(rec, 6)
    last = await get(address, number=3)
    assert len(last) == 3 and all(r.node_name == "node-1" for r in last)
    times = [r.flow.time.seconds for r in last]
    assert times == sorted(times) and last[-1].flow.time.ToNanoseconds() == T0 + 6 * STEP
    first = await get(address, number=2, first=True)
    assert [r.flow.time.ToNanoseconds() for r in first] == [T0 + STEP, T0 + 2 * STEP]
    assert len(await get(address)) == 0  # number 0 without a time range: no buffered flows
    everything = await get(address, number=2**64 - 1)
    assert len(everything) == 6 and kinds(everything) == ["flow"] * 6


async def test_since_until_and_filters(served: tuple[FlowRecorder, ObserverServer]) -> None:
    rec, server = served
    record(rec, 6)
    address = server.addresses[0]
    got = await get(address, since=timestamp(T0 + 3 * STEP), until=timestamp(T0 + 5 * STEP))
    assert [r.flow.time.ToNanoseconds() for r in got] == [T0 + 3 * STEP, T0 + 4 * STEP, T0 + 5 * STEP]
    got = await get(address, number=10, whitelist=[pb.FlowFilter(destination_pod=["data/db"])],
                    blacklist=[pb.FlowFilter(source_ip=["10.0.0.0/8"])])
    assert got == []
    got = await get(address, number=10, whitelist=[pb.FlowFilter(source_label=["app=client"])])
    assert len(got) == 6 and all(r.flow.source.pod_name == "client-1" for r in got)


async def test_reaching_past_overwritten_flows_is_reported(served: tuple[FlowRecorder, ObserverServer]) -> None:
    rec, server = served
    record(rec, 25)  # capacity 10: 15 overwritten
    address = server.addresses[1]
    got = await get(address, number=20)
    assert kinds(got) == ["lost_events"] + ["flow"] * 10
    assert (got[0].lost_events.source, got[0].lost_events.num_events_lost) == (pb.HUBBLE_RING_BUFFER, 15)
    assert kinds(await get(address, number=5)) == ["flow"] * 5  # all served from what is kept: nothing lost
    assert kinds(await get(address, number=1, first=True))[0] == "lost_events"  # the first ones are gone
    # a time range entirely within what is kept lost nothing; one reaching back did
    assert kinds(await get(address, since=timestamp(T0 + 20 * STEP))) == ["flow"] * 6
    assert kinds(await get(address, since=timestamp(T0)))[0] == "lost_events"


async def test_kernel_lost_events_are_served_in_place(served: tuple[FlowRecorder, ObserverServer]) -> None:
    rec, server = served
    record(rec, 2)
    rec.lost_kernel_events(9)
    record(rec, 1)
    got = await get(server.addresses[0], number=10)
    assert kinds(got) == ["flow", "flow", "lost_events", "flow"]
    assert (got[2].lost_events.source, got[2].lost_events.num_events_lost) == (pb.PERF_EVENT_RING_BUFFER, 9)


async def test_follow(served: tuple[FlowRecorder, ObserverServer]) -> None:
    rec, server = served
    record(rec, 3)
    channel, s = stub(server.addresses[1])
    async with channel:
        call = s.GetFlows(pb.GetFlowsRequest(number=2, follow=True,
                                             whitelist=[pb.FlowFilter(destination_port=[5432])]))
        it = call.__aiter__()
        got = [await asyncio.wait_for(it.__anext__(), 5) for _ in range(3)]
        assert kinds(got) == ["flow", "flow", "node_status"]
        assert got[2].node_status.state_change == pb.NODE_CONNECTED
        record(rec, 1, port=443)  # filtered out
        record(rec, 2)
        new = [await asyncio.wait_for(it.__anext__(), 5) for _ in range(2)]
        assert kinds(new) == ["flow", "flow"] and all(r.flow.l4.tcp.destination_port == 5432 for r in new)
        assert server.service.ring.followers == 1
        call.cancel()
    for _ in range(100):  # the server notices the cancelled stream and lets the follower go
        if server.service.ring.followers == 0:
            break
        await asyncio.sleep(0.02)
    assert server.service.ring.followers == 0


async def test_slow_follower_gets_lost_events(served: tuple[FlowRecorder, ObserverServer]) -> None:
    rec, server = served
    channel, s = stub(server.addresses[0])
    async with channel:
        call = s.GetFlows(pb.GetFlowsRequest(follow=True))
        it = call.__aiter__()
        assert kinds([await asyncio.wait_for(it.__anext__(), 5)]) == ["node_status"]
        record(rec, 12)  # follower queue of 5, filled before the server gets to run: 7 lost
        got: list[pb.GetFlowsResponse] = []
        while len(ports(got)) < 5 or not any(r.HasField("lost_events") for r in got):
            got.append(await asyncio.wait_for(it.__anext__(), 5))
        lost = next(r.lost_events for r in got if r.HasField("lost_events"))
        assert (lost.source, lost.num_events_lost) == (pb.OBSERVER_EVENTS_QUEUE, 7)
        call.cancel()
    status = await server_status(server.addresses[0])
    assert status.lost_events == 7


async def server_status(address: str) -> pb.ServerStatusResponse:
    channel, s = stub(address)
    async with channel:
        result: pb.ServerStatusResponse = await s.ServerStatus(pb.ServerStatusRequest(), timeout=5)
        return result


async def test_server_status(served: tuple[FlowRecorder, ObserverServer]) -> None:
    rec, server = served
    record(rec, 13)
    rec.lost_kernel_events(4)
    for address in server.addresses:
        status = await server_status(address)
        assert (status.num_flows, status.max_flows, status.seen_flows, status.lost_events, status.node_name) == \
            (9, 10, 13, 4, "node-1")  # the lost-events marker takes one of the 10 slots
        assert status.version and status.uptime_ns > 0


@pytest.mark.parametrize(("request_fields", "message"), [
    ({"follow": True, "first": True}, "follow"),
    ({"follow": True, "until": timestamp(T0)}, "follow"),
    ({"since": timestamp(T0 + 10), "until": timestamp(T0)}, "since"),
    ({"whitelist": [pb.FlowFilter(source_ip=["not-an-ip"])]}, "not-an-ip"),
])
async def test_invalid_requests(served: tuple[FlowRecorder, ObserverServer], request_fields: dict[str, object],
                                message: str) -> None:
    _rec, server = served
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await get(server.addresses[0], **request_fields)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in (e.value.details() or "")


async def test_unix_socket_is_claimed_handed_over_and_released(tmp_path: Path) -> None:
    path = tmp_path / "o.sock"
    one = ObserverServer(FlowRecorder("n1"))
    await one.start(unix_path=str(path))
    two = ObserverServer(FlowRecorder("n2"))
    await two.start(unix_path=str(path))  # an upgrade: the next server takes the path over
    assert (await server_status(str(path))).node_name == "n2"
    await one.stop(None)  # the old one leaves the path alone: it is not its socket any more
    assert (await server_status(str(path))).node_name == "n2"
    await two.stop(None)
    assert not path.exists()
    path.write_text("not a socket")
    with pytest.raises(OSError, match="not a socket"):
        await two.start(unix_path=str(path))
    with pytest.raises(ValueError):
        await two.start()
    stale = tmp_path / "stale.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(stale))
    sock.close()  # what a crashed agent leaves: the file, and nobody listening
    await two.start(unix_path=str(stale))
    assert (await server_status(str(stale))).node_name == "n2"
    await two.stop(None)
