"""Flow output formats of ``ambit observe``: compact, dict, json, table (after ``hubble observe -o``).

compact  one readable line per flow: time [node]: source -> destination event DIRECTION VERDICT (summary)
dict     one block of KEY: value lines per flow, blocks separated by a dashed line
json     one JSON object per line (a GetFlowsResponse, proto field names), for jq
table    aligned columns; widths are settled when ``flush`` is called (after the buffered flows)

Lost events are always printed ("EVENTS LOST: ..."), so a gap in the output is never silent. Colour (the
verdict, lost events) only when asked: the CLI turns it on for terminals.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Sequence
from typing import Literal, TextIO

from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp

from agent.telemetry import observer_pb2 as pb

Format = Literal["compact", "dict", "json", "table"]
FORMATS: tuple[Format, ...] = ("compact", "dict", "json", "table")

_RESET = "\x1b[0m"
_COLORS = {"FORWARDED": "\x1b[32m", "DROPPED": "\x1b[31m", "ERROR": "\x1b[33m", "LOST": "\x1b[31m"}
_SPIFFE = re.compile(r"^spiffe://[^/]+/ns/([^/]+)/sa/([^/]+)$")
_LOST_WHY = {
    pb.HUBBLE_RING_BUFFER: "older flows were overwritten in {node}'s buffer",
    pb.OBSERVER_EVENTS_QUEUE: "this reader fell behind {node}'s flows",
    pb.PERF_EVENT_RING_BUFFER: "{node}'s kernel ring buffer was full",
}
TABLE_HEADER = ("TIMESTAMP", "NODE", "SOURCE", "DESTINATION", "TYPE", "VERDICT", "SUMMARY")


def _datetime(ts: Timestamp, tz: dt.tzinfo | None) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts.seconds, tz=dt.UTC).astimezone(tz)


def stamp(ts: Timestamp, tz: dt.tzinfo | None) -> str:
    """ "Jan  2 15:04:05.123" (Go's StampMilli, as hubble prints it); local time unless ``tz``."""
    d = _datetime(ts, tz)
    return f"{d:%b} {d.day:2d} {d:%H:%M:%S}.{ts.nanos // 1_000_000:03d}"


def rfc3339(ts: Timestamp, tz: dt.tzinfo | None) -> str:
    """RFC 3339 with nanoseconds; "Z" for UTC."""
    d = _datetime(ts, tz)
    offset = d.strftime("%z")
    zone = "Z" if offset in ("+0000", "") else f"{offset[:3]}:{offset[3:]}"
    return f"{d:%Y-%m-%dT%H:%M:%S}.{ts.nanos:09d}{zone}"


def short_identity(ep: pb.Endpoint) -> str:
    """ "sa:NAME" when the SPIFFE ID is in the endpoint's namespace, else "ns/X/sa/Y", else the ID."""
    m = _SPIFFE.match(ep.identity)
    if not m:
        return ep.identity
    return f"sa:{m.group(2)}" if m.group(1) == ep.namespace else f"ns/{m.group(1)}/sa/{m.group(2)}"


def endpoint(ep: pb.Endpoint, ip: str, port: int, *, full_identity: bool = False) -> str:
    """ "ns/pod:port (identity)", or "ip:port" for an address outside the mesh."""
    host = f"{ep.namespace}/{ep.pod_name}" if ep.pod_name else (f"[{ip}]" if ":" in ip else ip)
    text = f"{host}:{port}"
    identity = ep.identity if full_identity else short_identity(ep)
    return f"{text} ({identity})" if identity else text


def _ends(flow: pb.Flow, full_identity: bool = False) -> tuple[str, str]:
    tcp = flow.l4.tcp
    return (endpoint(flow.source, flow.ip.source, tcp.source_port, full_identity=full_identity),
            endpoint(flow.destination, flow.ip.destination, tcp.destination_port, full_identity=full_identity))


def kind(flow: pb.Flow) -> str:
    """ "start EGRESS", "drop INGRESS", ..."""
    return f"{pb.EventType.Name(flow.event_type).lower()} {pb.TrafficDirection.Name(flow.traffic_direction)}"


def lost_text(resp: pb.GetFlowsResponse) -> str:
    lost = resp.lost_events
    why = _LOST_WHY.get(lost.source, "").format(node=resp.node_name or "the agent")
    text = f"EVENTS LOST: {pb.LostEventSource.Name(lost.source)} {lost.num_events_lost}"
    return f"{text} ({why})" if why else text


class Printer:
    """Writes GetFlowsResponses to ``out`` in one format."""

    def __init__(self, out: TextIO, fmt: Format = "compact", *, color: bool = False,
                 tz: dt.tzinfo | None = None) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown output format {fmt!r} (one of {', '.join(FORMATS)})")
        self.out = out
        self.fmt = fmt
        self.color = color
        self.tz = tz
        self._dicts = 0
        self._rows: list[tuple[str, ...]] = []
        self._widths: list[int] | None = None

    def _paint(self, text: str, key: str) -> str:
        return f"{_COLORS[key]}{text}{_RESET}" if self.color and key in _COLORS else text

    def write(self, resp: pb.GetFlowsResponse) -> None:
        """One response: a flow or lost events (node status messages are not printed)."""
        which = resp.WhichOneof("response_types")
        if which not in ("flow", "lost_events"):
            return
        if self.fmt == "json":
            self.out.write(json.dumps(json_format.MessageToDict(resp, preserving_proto_field_name=True),
                                      separators=(",", ":")) + "\n")
        elif self.fmt == "compact":
            self.out.write(self._compact(resp) + "\n")
        elif self.fmt == "dict":
            self._dict(resp)
        else:
            self._row(resp)

    def write_all(self, responses: Sequence[pb.GetFlowsResponse]) -> None:
        for resp in responses:
            self.write(resp)
        self.flush()

    # -- compact -------------------------------------------------------------------------------------------------
    def _compact(self, resp: pb.GetFlowsResponse) -> str:
        head = f"{stamp(resp.time, self.tz)} [{resp.node_name}]:"
        if resp.HasField("lost_events"):
            return f"{head} {self._paint(lost_text(resp), 'LOST')}"
        flow = resp.flow
        src, dst = _ends(flow)
        verdict = pb.Verdict.Name(flow.verdict)
        line = f"{head} {src} -> {dst} {kind(flow)} {self._paint(verdict, verdict)}"
        return f"{line} ({flow.summary})" if flow.summary else line

    # -- dict ----------------------------------------------------------------------------------------------------
    def _dict(self, resp: pb.GetFlowsResponse) -> None:
        if self._dicts:
            self.out.write("------------\n")
        self._dicts += 1
        rows = [("TIMESTAMP", rfc3339(resp.time, self.tz)), ("NODE", resp.node_name)]
        if resp.HasField("lost_events"):
            rows.append(("LOST", self._paint(lost_text(resp), "LOST")))
        else:
            flow = resp.flow
            src, dst = _ends(flow, full_identity=True)
            verdict = pb.Verdict.Name(flow.verdict)
            rows += [("SOURCE", src), ("DESTINATION", dst),
                     ("TYPE", f"{kind(flow)} (reporter: {pb.Reporter.Name(flow.reporter).lower()})"),
                     ("VERDICT", self._paint(verdict, verdict))]
            if flow.drop_reason_desc:
                rows.append(("DROP REASON", flow.drop_reason_desc))
            if flow.policy:
                rows.append(("POLICY", flow.policy))
            rows.append(("SUMMARY", flow.summary))
        width = max(len(k) for k, _ in rows)
        for key, value in rows:
            self.out.write(f"{key:>{width}}: {value}\n")

    # -- table ---------------------------------------------------------------------------------------------------
    def _row(self, resp: pb.GetFlowsResponse) -> None:
        when = stamp(resp.time, self.tz)
        if resp.HasField("lost_events"):
            row: tuple[str, ...] = (when, resp.node_name, "", "", "lost", "", lost_text(resp))
        else:
            flow = resp.flow
            src, dst = _ends(flow)
            row = (when, resp.node_name, src, dst, kind(flow), pb.Verdict.Name(flow.verdict), flow.summary)
        if self._widths is None:
            self._rows.append(row)
        else:
            self._emit(row)

    def _emit(self, row: tuple[str, ...]) -> None:
        assert self._widths is not None
        for i, cell in enumerate(row[:-1]):
            self._widths[i] = max(self._widths[i], len(cell))
        cells = []
        for i, cell in enumerate(row[:-1]):
            pad = " " * (self._widths[i] - len(cell))
            cells.append((self._paint(cell, cell) if i == 5 else cell) + pad)  # column 5: the verdict
        last = self._paint(row[-1], "LOST") if row[4] == "lost" else row[-1]
        self.out.write(("   ".join([*cells, last])).rstrip() + "\n")

    def flush(self) -> None:
        """Table: settle the column widths on the rows so far and print them (later rows print at once)."""
        if self.fmt == "table" and self._widths is None:
            rows = [TABLE_HEADER, *self._rows]
            self._widths = [max(len(r[i]) for r in rows) for i in range(len(TABLE_HEADER) - 1)]
            self._rows = []
            for row in rows:
                self._emit(row)
        self.out.flush()
