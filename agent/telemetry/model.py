"""The flow record an agent keeps in memory, and its protobuf form (agent/telemetry/observer.proto).

Records are plain slotted dataclasses: cheap to make on the data path and to filter. They become protobuf
messages only when a reader asks for them (``Flow.to_proto``). The enums mirror the proto's numbers
(tests/unit/telemetry/test_flows_recorder.py checks them against the descriptor).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, cast

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from agent.telemetry import observer_pb2 as pb


class Verdict(enum.IntEnum):
    """Flow.verdict"""

    VERDICT_UNKNOWN = 0
    FORWARDED = 1
    DROPPED = 2
    ERROR = 3


class Direction(enum.IntEnum):
    """Flow.traffic_direction"""

    TRAFFIC_DIRECTION_UNKNOWN = 0
    INGRESS = 1
    EGRESS = 2


class EventType(enum.IntEnum):
    """Flow.event_type"""

    EVENT_TYPE_UNKNOWN = 0
    START = 1
    END = 2
    DROP = 3
    KERNEL = 4


class Reporter(enum.IntEnum):
    """Flow.reporter"""

    REPORTER_UNKNOWN = 0
    SOURCE = 1
    DESTINATION = 2


class LostSource(enum.IntEnum):
    """LostEvent.source"""

    UNKNOWN_LOST_EVENT_SOURCE = 0
    PERF_EVENT_RING_BUFFER = 1  # the kernel's ring buffer
    OBSERVER_EVENTS_QUEUE = 2  # a follower's queue
    HUBBLE_RING_BUFFER = 3  # the agent's flow buffer


# TCP header byte 13, as the eBPF event carries it.
TCP_FLAGS: tuple[tuple[str, int], ...] = (
    ("FIN", 0x01), ("SYN", 0x02), ("RST", 0x04), ("PSH", 0x08),
    ("ACK", 0x10), ("URG", 0x20), ("ECE", 0x40), ("CWR", 0x80),
)
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10


def flag_names(flags: int) -> list[str]:
    """Names of the bits set in a TCP flags byte, in header order (FIN first)."""
    return [name for name, bit in TCP_FLAGS if flags & bit]


@dataclass(slots=True)
class Endpoint:
    """One end of a flow as the agent knows it. Only ``ip`` and ``port`` are required: a peer outside the
    mesh is just an address. Immutable by convention once made (flows share it); not frozen, as two are made
    per connection and a frozen dataclass sets each field through ``object.__setattr__``."""

    ip: str
    port: int
    identity: str | None = None  # SPIFFE ID, when known (for the source: only when proven by mTLS)
    namespace: str = ""
    pod_name: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    workload: str = ""  # owning workload (Deployment, StatefulSet, ...); the pod name is used when empty
    service: str = ""  # the Service hostname a client asked for ("web.default.svc.cluster.local"), if known

    def at(self, port: int, service: str | None = None) -> Endpoint:
        """This end at ``port`` (reached through ``service``, when given): a copy (dataclasses.replace costs four
        times as much)."""
        return Endpoint(self.ip, port, self.identity, self.namespace, self.pod_name, self.labels, self.workload,
                        self.service if service is None else service)

    @property
    def pod_key(self) -> str:
        """ "namespace/name", or "" for an endpoint that is not a known pod."""
        return f"{self.namespace}/{self.pod_name}" if self.pod_name else ""

    @property
    def service_ref(self) -> tuple[str, str]:
        """(namespace, name) of ``service`` ("name.namespace.svc.<domain>"), ("", "") when there is none."""
        name, _, rest = self.service.partition(".")
        return rest.partition(".")[0], name

    def service_proto(self) -> pb.Service | None:
        namespace, name = self.service_ref
        return pb.Service(name=name, namespace=namespace) if name else None

    def to_proto(self) -> pb.Endpoint:
        return pb.Endpoint(identity=self.identity or "", namespace=self.namespace, pod_name=self.pod_name,
                           labels=sorted(f"{k}={v}" for k, v in self.labels.items()),
                           workload=self.workload or self.pod_name, service=self.service)


def ip_version(ip: str) -> pb.IPVersion:
    """pb.IPVersion of an address string (IPv4 unless it has a colon)."""
    if not ip:
        return pb.IP_NOT_USED
    return pb.IPv6 if ":" in ip else pb.IPv4


def timestamp(ns: int) -> Timestamp:
    """A Timestamp from nanoseconds since the epoch."""
    return Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


@dataclass(slots=True)
class Flow:
    """One flow event. Immutable by convention once recorded (readers share it)."""

    time_ns: int  # wall clock, ns since the epoch
    uuid: str
    verdict: Verdict
    event_type: EventType
    direction: Direction
    reporter: Reporter
    node_name: str
    source: Endpoint
    destination: Endpoint
    encrypted: bool = False  # mutual TLS
    tcp_flags: int = 0  # TCP header byte 13 bits seen on this event
    drop_reason_desc: str = ""
    policy: str = ""
    bytes_sent: int = 0  # source -> destination
    bytes_received: int = 0  # destination -> source
    duration_ns: int = 0
    close_reason: str = ""
    summary: str = ""
    protocol: str = "tcp"

    def to_proto(self) -> pb.Flow:
        src, dst = self.source, self.destination
        flags = pb.TCPFlags(**{name: True for name in flag_names(self.tcp_flags)})
        msg = pb.Flow(
            time=timestamp(self.time_ns), uuid=self.uuid, verdict=cast("pb.Verdict", int(self.verdict)),
            drop_reason_desc=self.drop_reason_desc,
            ip=pb.IP(source=src.ip, destination=dst.ip, ipVersion=ip_version(src.ip),
                     encrypted=self.encrypted),
            l4=pb.Layer4(tcp=pb.TCP(source_port=src.port, destination_port=dst.port, flags=flags)),
            source=src.to_proto(), destination=dst.to_proto(), Type=pb.L3_L4, node_name=self.node_name,
            traffic_direction=cast("pb.TrafficDirection", int(self.direction)),
            event_type=cast("pb.EventType", int(self.event_type)), reporter=cast("pb.Reporter", int(self.reporter)),
            bytes_sent=self.bytes_sent, bytes_received=self.bytes_received, close_reason=self.close_reason,
            policy=self.policy, summary=self.summary,
            source_service=src.service_proto(), destination_service=dst.service_proto(),
        )
        if self.event_type == EventType.END:
            msg.duration.CopyFrom(Duration(seconds=self.duration_ns // 1_000_000_000,
                                           nanos=self.duration_ns % 1_000_000_000))
        return msg


@dataclass(frozen=True, slots=True)
class LostEvent:
    """Events that readers will never see; kept in the buffer in time order, like flows."""

    time_ns: int
    source: LostSource
    count: int

    def to_proto(self) -> pb.LostEvent:
        return pb.LostEvent(source=cast("pb.LostEventSource", int(self.source)), num_events_lost=self.count)


Entry = Flow | LostEvent


class FlowBuilder(Protocol):
    def build(self, pending: PendingFlow) -> Flow: ...


PendingFlow = tuple[FlowBuilder, object, int, Endpoint, Endpoint]
"""A flow kept as it came until someone reads it: (what builds it, what the builder needs of this one, the
sequence number of its uuid, its source and destination). A kernel event: its batch, the kernel's record, and its
ends as the agent knew them when it read the record (port 0); a proxied connection's start or end: its
``FlowHandle``, the EventType, and its ends as the handle keeps them (without their ports when it was given those
apart: ``FlowHandle.ends`` has them)."""
