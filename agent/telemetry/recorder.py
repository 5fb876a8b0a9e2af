"""What the agent calls to record flows: one ``FlowRecorder`` per agent.

    recorder = FlowRecorder(node, capacity=4096, metrics=metrics, resolve=lambda ip: endpoint_of(ip))
    handle = recorder.start(direction="EGRESS", reporter="source", source=src, destination=dst, mtls=True)
    ...
    handle.end(bytes_sent, bytes_received, reason="closed by client")      # or error=True
    recorder.drop(direction="INGRESS", reporter="destination", source=src, destination=dst, mtls=True,
                  reason="denied by AuthorizationPolicy web/deny-all rule 0", policy="web/deny-all")
    recorder.kernel_records(source, records)     # eBPF ring-buffer records (a telemetry.kernel.KernelRecords')
    recorder.lost_kernel_events(newly_lost)      # the kernel ring buffer was full

Every call writes a flow to the ring (``recorder.ring``, served by the observer) and updates the metrics.
``bytes_sent`` is what the source sent to the destination (the request direction), ``bytes_received`` what
it got back, whichever side reports. Calls are thread-safe and never block on readers. A kernel event is counted
at once and kept as it came; a connection's start and end are journaled, then counted and kept a batch at a time
(``flush``: every 10 ms on an event loop, and before anyone reads the ring or the metrics, so readers miss
nothing). Both become flows only when someone reads flows. A connection costs about 5 us of CPU in a loop
(``python -m bench.agent_path``), a kernel event well under 1 us.

Metric label for ``hubble_drop_total{reason}``: POLICY_DENIED when a policy decided, else the part of
``reason`` before the first ':' in UPPER_SNAKE case, so pass reasons as "<stable cause>: <details>"
(e.g. "STRICT mTLS: plaintext from 10.0.0.5").
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

from agent.telemetry.kernel import KernelKind, KernelRecords
from agent.telemetry.metrics import (
    CONNECT,
    DENY,
    NO_FLAGS,
    TLS_FAILURE,
    ClosedKey,
    ConnectionSeries,
    Metrics,
    Traffic,
)
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
    PendingFlow,
    Reporter,
    Verdict,
    flag_names,
)
from agent.telemetry.ring import FlowRing

__all__ = ["Endpoint", "FlowHandle", "FlowRecorder"]

log = logging.getLogger(__name__)

DirectionName = Literal["INGRESS", "EGRESS"]
ReporterName = Literal["source", "destination"]

_DIRECTIONS = {"INGRESS": Direction.INGRESS, "EGRESS": Direction.EGRESS}
_REPORTERS = {"source": Reporter.SOURCE, "destination": Reporter.DESTINATION}
_TLS_WORDS = re.compile(r"tls|certificate|handshake|identity|ssl", re.IGNORECASE)
# hubble_flows_processed_total's subtype and verdict labels of a flow (enum names cost a call each time)
_PROCESSED = {(e, v): (e.name.lower(), v.name) for e in EventType for v in Verdict}
_REPORTER_NAMES = {r: name for name, r in _REPORTERS.items()}
_STARTED = ("Trace", *_PROCESSED[EventType.START, Verdict.FORWARDED])  # ... of a connection's start flow
_ENDED = {error: ("Trace", *_PROCESSED[EventType.END, Verdict.ERROR if error else Verdict.FORWARDED])
          for error in (False, True)}  # ... of its end flow, by whether it failed
_KINDS_MAX = 1024  # kinds of kernel event described (the key space is small; a bound all the same)
_ADDRESSES_MAX = 4096  # kernel event addresses whose Endpoint is kept; past it the cache starts over
REJECTED_LOG_EVERY = 10.0  # seconds between two warnings about malformed kernel events
# A connection's start and end wait in the journal (``FlowRecorder.flush``) this long at most, or until this many
# wait: followers see flows that much later, never fewer of them; readers of the ring and the metrics see them all.
# A flush takes JOURNAL_TURN of them per loop turn (~8 us each in a busy agent: a turn of ~0.25 ms at most).
JOURNAL_WAIT = 0.01
JOURNAL_MAX = 256
JOURNAL_TURN = 32

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


class FlowHandle:
    """A started connection: call ``end`` once (later calls are ignored). Its start and end are journaled, counted
    and written a batch at a time (``FlowRecorder.flush``), and kept in the ring as this handle and the event, made
    ``Flow`` records only when read (``build``): a connection costs the proxy two appends to a list."""

    __slots__ = ("_direction", "_end", "_mtls", "_ports", "_recorder", "_reporter", "_sequence", "_series",
                 "_start_ns", "_time_ns", "_written", "destination", "source")

    def __init__(self, recorder: FlowRecorder, direction: Direction, reporter: Reporter, source: Endpoint,
                 destination: Endpoint, mtls: bool, sequence: int, ports: tuple[int, int] | None = None) -> None:
        self._recorder, self._direction, self._reporter = recorder, direction, reporter
        self.source, self.destination, self._mtls = source, destination, mtls
        self._ports = ports  # the ends' ports, when ``source`` and ``destination`` are given without them
        self._sequence = sequence
        self._series: ConnectionSeries | None = None
        self._time_ns, self._start_ns = recorder._clock(), recorder._monotonic()
        self._end: _Ended | None = None
        self._written = 0  # 0: in the journal; 1: its start written (and counted); 2: its end too

    @property
    def uuid(self) -> str:
        """The start flow's uuid."""
        return self._recorder._uuid_of(self._sequence)

    def end(self, bytes_sent: int, bytes_received: int, reason: str, error: bool = False, *,
            response_flags: str | None = None) -> None:
        """Record the end flow: bytes each way (source -> destination, and back), duration, close reason;
        verdict ERROR when ``error``. ``response_flags`` overrides the Istio flags derived from ``reason``."""
        if self._end is not None:
            return
        recorder = self._recorder
        self._end = _Ended(recorder._clock(), max(0, recorder._monotonic() - self._start_ns), bytes_sent,
                           bytes_received, reason, error, response_flags)
        if self._written:  # (else its start is still in the journal, and its end goes with it)
            recorder._journal_add(self)

    def ends(self) -> tuple[Endpoint, Endpoint]:
        """The connection's source and destination, with their ports."""
        if self._ports is None:
            return self.source, self.destination
        return self.source.at(self._ports[0]), self.destination.at(self._ports[1])

    def build(self, pending: PendingFlow) -> Flow:
        """The start or the end flow (``pending[1]``) of this connection (``model.FlowBuilder``)."""
        recorder, sequence = self._recorder, pending[2]
        source, destination = self.ends()
        if pending[1] is EventType.START:
            return Flow(self._time_ns, recorder._uuid_of(sequence), Verdict.FORWARDED, EventType.START,
                        self._direction, self._reporter, recorder.node, source, destination, self._mtls,
                        tcp_flags=SYN, summary="opened, " + ("mTLS" if self._mtls else "plaintext"))
        end = self._end
        assert end is not None  # (its end flow is written once it has ended)
        reason, error = end.reason, end.error
        traffic = f"sent {end.bytes_sent} B, received {end.bytes_received} B in {_duration(end.duration_ns)}"
        summary = f"failed: {reason or 'error'}; {traffic}" if error else f"{reason or 'closed'}; {traffic}"
        return Flow(end.time_ns, recorder._uuid_of(sequence), Verdict.ERROR if error else Verdict.FORWARDED,
                    EventType.END, self._direction, self._reporter, recorder.node, source, destination,
                    self._mtls, tcp_flags=RST if error else FIN, drop_reason_desc=reason if error else "",
                    bytes_sent=end.bytes_sent, bytes_received=end.bytes_received, duration_ns=end.duration_ns,
                    close_reason=reason, summary=summary)


class _Ended(NamedTuple):
    """How a connection ended, for its end flow."""

    time_ns: int
    duration_ns: int
    bytes_sent: int
    bytes_received: int
    reason: str
    error: bool
    response_flags: str | None  # overriding the Istio flags derived from ``reason``


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
        self._kernel_kinds: dict[bytes, _KernelKindFlow] = {}  # a record's kind bytes -> what its flows say
        self._addresses: dict[bytes, Endpoint] = {}  # a record's address bytes -> what resolve said, port 0
        self.kernel_rejected = 0  # records left out because they were malformed
        self._journal: list[FlowHandle] = []  # connections started or ended, not yet counted nor written
        self._flushing = threading.RLock()  # (re-entrant: a flush that reached a reader would not deadlock)
        self._flush_timer: asyncio.Handle | None = None  # the next flush, due or on the next turn
        self.ring.writes_held_by(self.flush)
        if metrics is not None:
            metrics.counts_held_by(self.flush)
        self._rejected_logged = (-REJECTED_LOG_EVERY, 0)  # (when, kernel_rejected then)

    def _uuid(self) -> str:
        return self._uuid_of(next(self._sequence))

    def _uuid_of(self, sequence: int) -> str:
        return f"{self._uuid_prefix}-{sequence & 0xFFFFFFFFFFFF:012x}"

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
            self.metrics.flow_processed(type_, *_PROCESSED[flow.event_type, flow.verdict])

    def start(self, *, direction: DirectionName, reporter: ReporterName, source: Endpoint, destination: Endpoint,
              mtls: bool, ports: tuple[int, int] | None = None) -> FlowHandle:
        """A connection the proxy accepted and forwards: a start flow, verdict FORWARDED. ``ports``: the ends' ports,
        ``source`` and ``destination`` being given without them (the ported copies are made only if the flows are
        read: a proxy's ends are the same few pods, their ports new on every connection)."""
        try:
            d, r = _DIRECTIONS[direction], _REPORTERS[reporter]
        except KeyError as e:
            raise ValueError(f"direction must be INGRESS|EGRESS and reporter source|destination, got {e}") from None
        handle = FlowHandle(self, d, r, source, destination, mtls, next(self._sequence), ports)
        self._journal_add(handle)
        return handle

    def _journal_add(self, handle: FlowHandle) -> None:
        journal = self._journal
        journal.append(handle)
        if len(journal) == 1:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no event loop (a script, a check): at once
                self.flush()
                return
            self._flush_timer = loop.call_later(JOURNAL_WAIT, self._flush_due)
        elif len(journal) >= JOURNAL_MAX:
            self.flush()

    def _flush_due(self) -> None:
        self._flush_timer = None
        self.flush(JOURNAL_TURN)

    def flush(self, most: int | None = None) -> None:
        """Count and write the connections' starts and ends journaled so far; with ``most`` (on an event loop), that
        many at most, the rest on the loop's next turn (a batch stalls no connection for long). Whatever reads the
        ring or the metrics calls this first (``writes_held_by``, ``counts_held_by``), as do drops and lost events
        (the ring keeps the order the proxies recorded things in)."""
        with self._flushing:
            if self._flush_timer is not None:
                self._flush_timer.cancel()
                self._flush_timer = None
            journal = self._journal
            if most is not None and len(journal) > most:
                journal, self._journal = journal[:most], journal[most:]
                self._flush_timer = asyncio.get_running_loop().call_soon(self._flush_due)
            else:
                self._journal = []
            if journal:
                self._write(journal)

    def _write(self, journal: list[FlowHandle]) -> None:
        """One batch of the journal counted (by series) and written to the ring (under ``_flushing``)."""
        metrics, sequence = self.metrics, self._sequence
        pending: list[PendingFlow] = []
        counts = [0, 0, 0]  # starts, ends, failed ends (hubble_flows_processed_total)
        opened: dict[Traffic, int] = {}  # the batch's connections by series, counted once per series
        closed: dict[ClosedKey, list[int]] = {}
        # A series per shape of connection in this batch: the ends are the hub's memo objects (the same object for
        # the same pod in one mesh state), held by the handles while this runs, so their ids are theirs.
        shapes: dict[tuple[Reporter, bool, int, int], ConnectionSeries] = {}
        for handle in journal:
            if not handle._written:
                handle._written = 1
                counts[0] += 1
                if metrics is not None:
                    shape = (handle._reporter, handle._mtls, id(handle.source), id(handle.destination))
                    new = shapes.get(shape)
                    if new is None:
                        new = shapes[shape] = metrics.series_of(_REPORTER_NAMES[handle._reporter], handle.source,
                                                                handle.destination, handle._mtls)
                    handle._series = new
                    opened[new.traffic] = opened.get(new.traffic, 0) + 1
                pending.append((handle, EventType.START, handle._sequence, handle.source, handle.destination))
            end = handle._end
            if end is None or handle._written == 2:
                continue
            handle._written = 2
            counts[1 + end.error] += 1
            pending.append((handle, EventType.END, next(sequence), handle.source, handle.destination))
            series, handle._series = handle._series, None  # (counted: the flow kept in the ring needs it no more)
            if series is not None:
                flags = NO_FLAGS if not end.error else (end.response_flags or response_flags_for(end.reason))
                key = (series.traffic, series.epoch, flags, end.error)
                total = closed.get(key)
                if total is None:
                    closed[key] = [1, end.bytes_sent, end.bytes_received]
                else:
                    total[0] += 1
                    total[1] += end.bytes_sent
                    total[2] += end.bytes_received
        if pending:
            self.ring.write_pending(pending)
        if metrics is not None:
            if opened or closed:
                metrics.count(opened, closed)
            for labels, n in zip((_STARTED, _ENDED[False], _ENDED[True]), counts, strict=True):
                if n:
                    metrics.flow_processed(*labels, n)

    def drop(self, *, direction: DirectionName, reporter: ReporterName, source: Endpoint, destination: Endpoint,
             mtls: bool, reason: str, policy: str | None = None, response_flags: str = DENY) -> None:
        """A connection the proxy refused: DROPPED, drop_reason_desc = reason (for a policy deny it names the
        policy and rule); ``policy`` is the deciding policy ("namespace/name")."""
        self.flush()
        summary = reason if not policy or policy in reason else f"{reason} (policy {policy})"
        flow = self._new(Verdict.DROPPED, EventType.DROP, direction, reporter, source, destination, mtls,
                         summary, drop_reason_desc=reason, policy=policy or "")
        self._record(flow, "Drop")
        if self.metrics is not None:
            self.metrics.dropped(drop_code(reason, policy), "TCP")
            self.metrics.connection_denied(reporter, source, destination, mtls, response_flags)

    def forget_addresses(self) -> None:
        """What ``resolve`` says of an address may have changed (the mesh changed): ask it again."""
        self._addresses = {}

    def kernel_records(self, source: KernelRecords, records: Sequence[bytes]) -> int:
        """eBPF ring-buffer records: each a KERNEL flow, DROPPED for drops (no listener when fail-closed, stale
        flow...), else FORWARDED with the TCP flags seen (counted in hubble_tcp_flags_total). Counted in the
        metrics now, kept in the ring as they came, with their ends as ``resolve`` knows them now and their
        uuid, and made flows when read. A record of the wrong size or one ``source`` cannot describe is left
        out, logged and counted (``kernel_rejected``, ambit_kernel_events_rejected_total); the others are kept.
        Returns how many were kept."""
        kinds = self._kernel_kinds
        if len(kinds) >= _KINDS_MAX:
            kinds.clear()
        if len(self._addresses) >= _ADDRESSES_MAX:
            self._addresses = {}
        known, size, sequence = self._addresses, source.size, self._sequence
        kind_at, src_at, dst_at = source.kind, source.source_address, source.destination_address
        batch = _KernelBatch(self, source, self._clock() - self._monotonic())
        pending: list[PendingFlow] = []
        counts: dict[tuple[bytes, bool], int] = {}  # (kind, source is IPv6) -> events
        for raw in records:
            kind = raw[kind_at]
            if (len(raw) != size or kind not in kinds) and not self._described(source, raw, kind):
                continue
            src = known.get(raw[src_at]) or self._address(source, raw[src_at])
            dst = known.get(raw[dst_at]) or self._address(source, raw[dst_at])
            key = (kind, ":" in src.ip)
            counts[key] = counts.get(key, 0) + 1
            pending.append((batch, raw, next(sequence), src, dst))
        if pending:
            self.ring.write_pending(pending)
        if self.metrics is not None:
            for (kind, v6), n in counts.items():
                k = kinds[kind]
                self.metrics.flow_processed(k.flow_type, "kernel", k.verdict.name, n)
                if k.drop_code:
                    self.metrics.dropped(k.drop_code, "TCP", n)
                self.metrics.tcp_flags(k.counted_flags, "IPv6" if v6 else "IPv4", n)
        return len(pending)

    def _described(self, source: KernelRecords, raw: bytes, kind: bytes) -> bool:
        """A record whose size or kind was not seen yet: True if it is well formed (its kind now known)."""
        try:
            if len(raw) != source.size:
                raise ValueError(f"kernel event: a record of {len(raw)} bytes, expected {source.size}")
            self._kernel_kinds[kind] = _KernelKindFlow.of(source.describe(kind))
        except ValueError as e:
            self.kernel_rejected += 1
            if self.metrics is not None:
                self.metrics.kernel_event_rejected()
            when, then = self._rejected_logged
            now = time.monotonic()
            if now - when >= REJECTED_LOG_EVERY:
                log.warning("left out a malformed kernel event (%d in all, %d since the last warning): %s",
                            self.kernel_rejected, self.kernel_rejected - then, e)
                self._rejected_logged = (now, self.kernel_rejected)
            return False
        return True

    def _address(self, source: KernelRecords, raw: bytes) -> Endpoint:
        ip = source.address(raw)
        known = self._resolve(ip) if self._resolve is not None else None
        e = Endpoint(ip, 0) if known is None else known.at(0)
        self._addresses[raw] = e
        return e

    def _kernel_flow(self, source: KernelRecords, wall_offset: int, pending: PendingFlow) -> Flow:
        """The flow of a kernel record, from the record and what kernel_records kept of it."""
        _, raw, sequence, src, dst = pending
        assert isinstance(raw, bytes)  # (what kernel_records keeps)
        ev = source.decode(raw)
        k = self._kernel_kinds.get(raw[source.kind]) or _KernelKindFlow.of(ev.kind)
        return Flow(wall_offset + ev.ts_ns, self._uuid_of(sequence), k.verdict, EventType.KERNEL, k.direction,
                    k.reporter, self.node, src.at(ev.sport), dst.at(ev.dport), False,
                    tcp_flags=k.tcp_flags, drop_reason_desc=k.drop_reason_desc, summary=k.summary)

    def lost_kernel_events(self, count: int) -> None:
        """``count`` events the kernel could not queue (the ring buffer was full) since the last call: counted
        in hubble_lost_events_total and shown to every reader in place."""
        if count <= 0:
            return
        self.flush()
        self.ring.write(LostEvent(self._clock(), LostSource.PERF_EVENT_RING_BUFFER, count))
        if self.metrics is not None:
            self.metrics.lost_events(LostSource.PERF_EVENT_RING_BUFFER.name, count)


class _KernelBatch:
    """What the records of one ``kernel_records`` call share: where they came from, the wall clock's offset from
    the kernel's clock then; builds their flows when they are read (``model.FlowBuilder``)."""

    __slots__ = ("recorder", "source", "wall_offset")

    def __init__(self, recorder: FlowRecorder, source: KernelRecords, wall_offset: int) -> None:
        self.recorder, self.source, self.wall_offset = recorder, source, wall_offset

    def build(self, pending: PendingFlow) -> Flow:
        return self.recorder._kernel_flow(self.source, self.wall_offset, pending)


@dataclass(frozen=True, slots=True)
class _KernelKindFlow:
    """What a kind of kernel event makes of its flows and metrics, worked out once per kind."""

    tcp_flags: int
    verdict: Verdict
    direction: Direction
    reporter: Reporter
    drop_reason_desc: str
    summary: str
    flow_type: str  # hubble_flows_processed_total{type}
    drop_code: str  # hubble_drop_total{reason}, "" when not a drop
    counted_flags: tuple[str, ...]  # hubble_tcp_flags_total{flag}

    @classmethod
    def of(cls, k: KernelKind) -> _KernelKindFlow:
        if k.dropped:
            summary = f"dropped in the kernel: {k.reason or k.action}"
        else:
            summary = f"TCP Flags: {', '.join(flag_names(k.tcp_flags)) or 'none'}; {k.action}" + (
                f" ({k.reason})" if k.reason else "")
        return cls(k.tcp_flags, Verdict.DROPPED if k.dropped else Verdict.FORWARDED,
                   Direction.INGRESS if k.toward_pod else Direction.EGRESS,
                   Reporter.DESTINATION if k.toward_pod else Reporter.SOURCE, k.reason if k.dropped else "", summary,
                   "Drop" if k.dropped else "Trace", (k.reason_code or "UNKNOWN") if k.dropped else "",
                   _COUNTED_FLAGS[k.tcp_flags & 0xFF])


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


_COUNTED_FLAGS = tuple(tuple(_counted_flags(flags)) for flags in range(256))  # per TCP flags byte
