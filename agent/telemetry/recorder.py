"""What the agent calls to record flows: one ``FlowRecorder`` per agent.

    recorder = FlowRecorder(node, capacity=4096, metrics=metrics, resolve=lambda ip: endpoint_of(ip))
    handle = recorder.start(direction="EGRESS", reporter="source", source=src, destination=dst, mtls=True)
    ...
    handle.end(bytes_sent, bytes_received, reason="closed by client")      # or error=True
    recorder.drop(direction="INGRESS", reporter="destination", source=src, destination=dst, mtls=True,
                  reason="denied by AuthorizationPolicy web/deny-all rule 0", policy="web/deny-all")
    recorder.kernel_event(event)                 # a telemetry.kernel.KernelEvent (eBPF ring buffer)
    recorder.lost_kernel_events(newly_lost)      # the kernel ring buffer was full

Every call writes a flow to the ring (``recorder.ring``, served by the observer) and updates the metrics.
``bytes_sent`` is what the source sent to the destination (the request direction), ``bytes_received`` what
it got back, whichever side reports. Calls are thread-safe and never block on readers; a connection (start +
end, with metrics) costs about 20 us of CPU.

Metric label for ``hubble_drop_total{reason}``: POLICY_DENIED when a policy decided, else the part of
``reason`` before the first ':' in UPPER_SNAKE case, so pass reasons as "<stable cause>: <details>"
(e.g. "STRICT mTLS: plaintext from 10.0.0.5").
"""

from __future__ import annotations

import itertools
import os
import re
import time
from collections.abc import Callable
from typing import Literal

from agent.telemetry.kernel import KernelEvent
from agent.telemetry.metrics import CONNECT, DENY, NO_FLAGS, TLS_FAILURE, ConnectionSeries, Metrics
from agent.telemetry.model import (
    ACK,
    FIN,
    RST,
    SYN,
    Direction,
    Endpoint,
    EventType,
    Flow,
    LostEvent,
    LostSource,
    Reporter,
    Verdict,
    flag_names,
)
from agent.telemetry.ring import FlowRing

__all__ = ["Endpoint", "FlowHandle", "FlowRecorder"]

DirectionName = Literal["INGRESS", "EGRESS"]
ReporterName = Literal["source", "destination"]

_DIRECTIONS = {"INGRESS": Direction.INGRESS, "EGRESS": Direction.EGRESS}
_REPORTERS = {"source": Reporter.SOURCE, "destination": Reporter.DESTINATION}
_TLS_WORDS = re.compile(r"tls|certificate|handshake|identity|ssl", re.IGNORECASE)

def drop_code(reason: str, policy: str | None) -> str:
    """The low-cardinality hubble_drop_total reason for an agent drop."""
    if policy:
        return "POLICY_DENIED"
    head = reason.partition(":")[0]
    code = "_".join(re.findall(r"[A-Za-z0-9]+", head)).upper()[:48]
    return code or "UNKNOWN"


def response_flags_for(reason: str) -> str:
    """Istio response flags for a failed connection: TLS_FAILURE when the reason is about TLS or identity,
    else CONNECT (the upstream connection failed)."""
    return TLS_FAILURE if _TLS_WORDS.search(reason) else CONNECT


def _duration(ns: int) -> str:
    return f"{ns / 1e9:.3f}s"


def _family(ip: str) -> str:
    return "IPv6" if ":" in ip else "IPv4"


class FlowHandle:
    """A started connection: call ``end`` once (later calls are ignored)."""

    __slots__ = ("_done", "_flow", "_recorder", "_series", "_start_ns")

    def __init__(self, recorder: FlowRecorder, flow: Flow, series: ConnectionSeries | None, start_ns: int) -> None:
        self._recorder = recorder
        self._flow = flow
        self._series = series
        self._start_ns = start_ns
        self._done = False

    @property
    def uuid(self) -> str:
        """The start flow's uuid."""
        return self._flow.uuid

    def end(self, bytes_sent: int, bytes_received: int, reason: str, error: bool = False, *,
            response_flags: str | None = None) -> None:
        """Record the end flow: bytes each way (source -> destination, and back), duration, close reason;
        verdict ERROR when ``error``. ``response_flags`` overrides the Istio flags derived from ``reason``."""
        if self._done:
            return
        self._done = True
        self._recorder._end(self, bytes_sent, bytes_received, reason, error, response_flags)


class FlowRecorder:
    """Records the agent's flows into ``self.ring`` and counts them in ``self.metrics`` (when given)."""

    def __init__(self, node: str, capacity: int = 4096, metrics: Metrics | None = None, *,
                 resolve: Callable[[str], Endpoint | None] | None = None,
                 clock: Callable[[], int] = time.time_ns, monotonic: Callable[[], int] = time.monotonic_ns) -> None:
        """``resolve(ip)`` enriches kernel events with what the agent knows about an address (a pod's
        Endpoint; its port is replaced). ``clock`` is wall time in ns; ``monotonic`` the kernel's clock."""
        self.node = node
        self.ring = FlowRing(capacity)
        self.metrics = metrics
        self._resolve = resolve
        self._clock = clock
        self._monotonic = monotonic
        # Flow ids: UUID v4 form, 74 random bits per recorder and a counter (uuid4() per flow costs 5 us).
        r = os.urandom(10).hex()
        self._uuid_prefix = f"{r[:8]}-{r[8:12]}-4{r[12:15]}-{8 | (int(r[15], 16) & 3):x}{r[16:19]}"
        self._sequence = itertools.count(1)

    def _uuid(self) -> str:
        return f"{self._uuid_prefix}-{next(self._sequence) & 0xFFFFFFFFFFFF:012x}"

    def _new(self, verdict: Verdict, event: EventType, direction: str, reporter: str, source: Endpoint,
             destination: Endpoint, mtls: bool, summary: str, drop_reason_desc: str = "", policy: str = "") -> Flow:
        try:
            d, r = _DIRECTIONS[direction], _REPORTERS[reporter]
        except KeyError as e:
            raise ValueError(f"direction must be INGRESS|EGRESS and reporter source|destination, got {e}") from None
        return Flow(self._clock(), self._uuid(), verdict, event, d, r, self.node, source, destination,
                    mtls, tcp_flags=SYN, drop_reason_desc=drop_reason_desc, policy=policy, summary=summary)

    def _record(self, flow: Flow, type_: str) -> None:
        self.ring.write(flow)
        if self.metrics is not None:
            self.metrics.flow_processed(type_, flow.event_type.name.lower(), flow.verdict.name)

    def start(self, *, direction: DirectionName, reporter: ReporterName, source: Endpoint, destination: Endpoint,
              mtls: bool) -> FlowHandle:
        """A connection the proxy accepted and forwards: a start flow, verdict FORWARDED."""
        flow = self._new(Verdict.FORWARDED, EventType.START, direction, reporter, source, destination, mtls,
                         "opened, " + ("mTLS" if mtls else "plaintext"))
        self._record(flow, "Trace")
        series = None
        if self.metrics is not None:
            series = self.metrics.connection_opened(reporter, source, destination, mtls)
        return FlowHandle(self, flow, series, self._monotonic())

    def _end(self, handle: FlowHandle, bytes_sent: int, bytes_received: int, reason: str, error: bool,
             response_flags: str | None) -> None:
        start = handle._flow
        duration = max(0, self._monotonic() - handle._start_ns)
        verdict = Verdict.ERROR if error else Verdict.FORWARDED
        traffic = f"sent {bytes_sent} B, received {bytes_received} B in {_duration(duration)}"
        summary = f"failed: {reason or 'error'}; {traffic}" if error else f"{reason or 'closed'}; {traffic}"
        flow = Flow(self._clock(), self._uuid(), verdict, EventType.END, start.direction, start.reporter,
                    self.node, start.source, start.destination, start.encrypted, tcp_flags=RST if error else FIN,
                    drop_reason_desc=reason if error else "", bytes_sent=bytes_sent, bytes_received=bytes_received,
                    duration_ns=duration, close_reason=reason, summary=summary)
        self._record(flow, "Trace")
        if handle._series is not None:
            flags = NO_FLAGS if not error else (response_flags or response_flags_for(reason))
            handle._series.close(bytes_sent, bytes_received, flags, failed=error)

    def drop(self, *, direction: DirectionName, reporter: ReporterName, source: Endpoint, destination: Endpoint,
             mtls: bool, reason: str, policy: str | None = None, response_flags: str = DENY) -> None:
        """A connection the proxy refused: DROPPED, drop_reason_desc = reason (for a policy deny it names the
        policy and rule); ``policy`` is the deciding policy ("namespace/name")."""
        summary = reason if not policy or policy in reason else f"{reason} (policy {policy})"
        flow = self._new(Verdict.DROPPED, EventType.DROP, direction, reporter, source, destination, mtls,
                         summary, drop_reason_desc=reason, policy=policy or "")
        self._record(flow, "Drop")
        if self.metrics is not None:
            self.metrics.dropped(drop_code(reason, policy), "TCP")
            self.metrics.connection_denied(reporter, source, destination, mtls, response_flags)

    def _endpoint(self, ip: str, port: int) -> Endpoint:
        known = self._resolve(ip) if self._resolve is not None else None
        if known is None:
            return Endpoint(ip, port)
        return Endpoint(ip, port, known.identity, known.namespace, known.pod_name, known.labels, known.workload,
                        known.service)  # (dataclasses.replace costs four times as much)

    def kernel_event(self, ev: KernelEvent) -> None:
        """One eBPF ring-buffer event: a KERNEL flow, DROPPED for drops (no listener when fail-closed, stale
        flow...), else FORWARDED with the TCP flags seen; the flags are counted in hubble_tcp_flags_total."""
        wall = self._clock() - self._monotonic() + ev.ts_ns
        flags = flag_names(ev.tcp_flags)
        if ev.dropped:
            summary = f"dropped in the kernel: {ev.reason or ev.action}"
        else:
            summary = f"TCP Flags: {', '.join(flags) or 'none'}; {ev.action}" + (f" ({ev.reason})" if ev.reason else "")
        flow = Flow(wall, self._uuid(), Verdict.DROPPED if ev.dropped else Verdict.FORWARDED, EventType.KERNEL,
                    Direction.INGRESS if ev.toward_pod else Direction.EGRESS,
                    Reporter.DESTINATION if ev.toward_pod else Reporter.SOURCE, self.node,
                    self._endpoint(ev.src, ev.sport), self._endpoint(ev.dst, ev.dport), False,
                    tcp_flags=ev.tcp_flags, drop_reason_desc=ev.reason if ev.dropped else "", summary=summary)
        self._record(flow, "Drop" if ev.dropped else "Trace")
        if self.metrics is not None:
            if ev.dropped:
                self.metrics.dropped(ev.reason_code or "UNKNOWN", "TCP")
            self.metrics.tcp_flags(_counted_flags(ev.tcp_flags), _family(ev.src))

    def lost_kernel_events(self, count: int) -> None:
        """``count`` events the kernel could not queue (the ring buffer was full) since the last call: counted
        in hubble_lost_events_total and shown to every reader in place."""
        if count <= 0:
            return
        self.ring.write(LostEvent(self._clock(), LostSource.PERF_EVENT_RING_BUFFER, count))
        if self.metrics is not None:
            self.metrics.lost_events(LostSource.PERF_EVENT_RING_BUFFER.name, count)


def _counted_flags(flags: int) -> list[str]:
    """Hubble's hubble_tcp_flags_total flag values for one packet's flags."""
    out = []
    if flags & SYN:
        out.append("SYN-ACK" if flags & ACK else "SYN")
    if flags & FIN:
        out.append("FIN")
    if flags & RST:
        out.append("RST")
    return out
