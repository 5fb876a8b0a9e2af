"""``ambit observe``: the flows of one or more node agents, filtered, merged in time order (like
``hubble observe``).

    ambit observe                                  the last 20 flows of every agent of the lab
    ambit observe -f --verdict DROPPED             follow denials as they happen
    ambit observe -n shop --to-port 5432 --last 100 -o json | jq .flow.drop_reason_desc
    ambit observe --from-pod shop/web --not --to-namespace shop
    ambit observe --server /run/ambit/observer.sock --since 5m
    ambit observe --server 10.0.0.7:4244 --tls-client-cert-file op/tls.crt --tls-client-key-file op/tls.key \
        --tls-ca-cert-files op/ca.crt

Where the flows come from: every ``--server ADDR`` (repeatable; a unix socket path, or host:port of an
agent's observer port). Without --server, the agents of the lab (``ambit lab``): lab.json lists its nodes,
and each node's agent serves its observer on ``<lab dir>/observer/<node>.sock`` unless lab.json names
another address for the node (``"observer"``). See ``lab_servers``.

A unix socket is plain (whoever may open it may read). A host:port is always mutual TLS, with Hubble's flag
names: the operator's certificate and key (``ambit ca --issue operator``), the CA certificates the agent's
certificate must chain to, and the name it must carry (observer.ambit.internal). Each flag also reads an
environment variable: AMBIT_TLS_CLIENT_CERT_FILE, AMBIT_TLS_CLIENT_KEY_FILE, AMBIT_TLS_CA_CERT_FILES
(comma-separated), AMBIT_TLS_SERVER_NAME.

In Kubernetes, reach each agent pod (DaemonSet) on its observer port: from a workstation with one
``kubectl -n <ns> port-forward pod/<agent pod> <local port>:<observer port>`` per agent and
``--server 127.0.0.1:<local port>`` for each, with the operator certificate; on a node, through its socket
(``kubectl -n <ns> exec <agent pod> -- ambit observe --server /run/ambit/observer.sock``).

Filters follow hubble's rules: flags about one side (--from-*, --to-*) and flags about either side (--pod,
-n, --ip, --port, -l, --identity) combine into filters where every flag must hold, several values of one
flag are alternatives, and ``--not`` moves the next filter flag to the deny list.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import grpc
import grpc.aio

from agent.lab.runtime import LABS_ROOT, LabPaths, lab_name, present_labs
from agent.telemetry import observer_pb2 as pb
from agent.telemetry import observer_pb2_grpc as pb_grpc
from agent.telemetry.model import timestamp
from agent.telemetry.observer_tls import OBSERVER_SERVER_NAME, ClientTlsFiles, TlsMaterialError
from agent.telemetry.printer import FORMATS, Printer

DEFAULT_LAST = 20


class ObserveError(Exception):
    """A problem the user must fix; the message says how."""


# -- where the agents are -----------------------------------------------------------------------------------------
def lab_observer_socket(lab_dir: Path, node: str) -> Path:
    """Where a lab node's agent serves its observer unless lab.json says otherwise."""
    return LabPaths(lab_dir).observer_socket(node)


def lab_servers(lab: str | None = None, root: Path = LABS_ROOT) -> list[str]:
    """The observer addresses of a lab's agents. ``lab``: a name (default $AMBIT_LAB, else the only lab,
    else "ambit")."""
    present = present_labs(root)
    if not (lab or os.environ.get("AMBIT_LAB") or present):
        raise ObserveError(f"no lab found under {root} and no --server given: start one with "
                           f"`ambit lab up`, or name agents with --server ADDR (unix socket or host:port)")
    name = lab_name(lab, root)
    lab_dir = root / name
    try:
        info = json.loads((lab_dir / "lab.json").read_text())
    except FileNotFoundError:
        others = f" (labs present: {', '.join(present)}; choose one with --lab)" if present else ""
        raise ObserveError(f"no lab {name!r} under {root}{others}; start one with `ambit lab up`, or "
                           f"name agents with --server ADDR") from None
    except (OSError, ValueError) as e:
        raise ObserveError(f"cannot read {lab_dir / 'lab.json'}: {e}") from None
    nodes = info.get("nodes") or []
    if not nodes:
        raise ObserveError(f"lab {name!r} has no nodes yet (phase: {info.get('phase', '?')})")
    if info.get("agents") is False:
        raise ObserveError(f"lab {name!r} runs without agents: there are no flows to observe")
    return [str(n.get("observer") or lab_observer_socket(lab_dir, n["name"])) for n in nodes]


def is_unix(address: str) -> bool:
    """A unix socket: unix:..., or a path (anything with a '/' or ending in .sock)."""
    if address.startswith(("dns:", "ipv4:", "ipv6:")):
        return False
    return address.startswith("unix:") or "/" in address or address.endswith(".sock")


def grpc_target(address: str) -> str:
    """A gRPC target for a unix socket path (anything with a '/', or unix:...) or host:port."""
    if is_unix(address) and not address.startswith("unix:"):
        return f"unix:{os.path.abspath(address)}"
    return address


@dataclass(frozen=True)
class Dialer:
    """How to reach an agent: its unix socket plainly, a TCP address with the operator's mutual TLS."""

    credentials: grpc.ChannelCredentials | None = None
    options: list[tuple[str, str]] = field(default_factory=list)

    def channel(self, server: str) -> grpc.aio.Channel:
        if is_unix(server):
            return grpc.aio.insecure_channel(grpc_target(server))
        if self.credentials is None:  # (main checks before dialling)
            raise ObserveError(f"{server}: a TCP observer needs the operator's TLS certificate")
        return grpc.aio.secure_channel(grpc_target(server), self.credentials, options=self.options)


def dialer(args: argparse.Namespace, servers: Sequence[str]) -> Dialer:
    """The TLS material for the TCP servers among ``servers``, read and checked (none needed without any)."""
    tcp = [s for s in servers if not is_unix(s)]
    given = {"--tls-client-cert-file": args.tls_client_cert_file, "--tls-client-key-file": args.tls_client_key_file,
             "--tls-ca-cert-files": args.tls_ca_cert_files}
    if not tcp:
        return Dialer()
    if missing := [flag for flag, value in given.items() if not value]:
        raise ObserveError(f"{', '.join(tcp)}: an agent's TCP observer serves mutual TLS only; missing "
                           f"{', '.join(missing)} (the operator certificate: `ambit ca --issue operator`; or read "
                           "the node's unix socket)")
    files = ClientTlsFiles(tuple(Path(p) for p in args.tls_ca_cert_files), Path(args.tls_client_cert_file),
                           Path(args.tls_client_key_file), args.tls_server_name)
    try:
        return Dialer(files.credentials(), files.options())
    except TlsMaterialError as e:
        raise ObserveError(str(e)) from None


# -- time ---------------------------------------------------------------------------------------------------------
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h|d)")


def parse_time(value: str, now: float | None = None) -> float:
    """A duration ago ("5m", "1h30m", "90s") or an RFC 3339 / ISO 8601 time, as seconds since the epoch."""
    now = time.time() if now is None else now
    text = value.strip()
    if _DURATION.fullmatch(text) or re.fullmatch(rf"(?:{_DURATION.pattern})+", text):
        return now - sum(float(n) * _UNITS[u] for n, u in _DURATION.findall(text))
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is neither a duration (5m, 1h30m, 90s) nor an RFC 3339 time (2024-05-01T12:00:00Z)"
        ) from None
    if when.tzinfo is None:
        when = when.astimezone()  # local time
    return when.timestamp()


# -- filters ------------------------------------------------------------------------------------------------------
@dataclass
class FilterSpec:
    """One filter flag as given: which FlowFilter field stem, which side, the value, negated or not."""

    stem: str
    side: str  # "from" | "to" | "either" | "" (not sided)
    value: Any
    negated: bool


class _FilterAction(argparse.Action):
    """Records a filter flag in command-line order, taking a pending --not with it."""

    def __init__(self, option_strings: Sequence[str], dest: str, *, stem: str, side: str,
                 convert: Callable[[str], Any] = str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.stem, self.side, self.convert = stem, side, convert

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        try:
            value = self.convert(values)
        except (ValueError, KeyError):
            parser.error(f"{option_string}: invalid value {values!r}")
        specs: list[FilterSpec] = getattr(namespace, "filters", None) or []
        specs.append(FilterSpec(self.stem, self.side, value, bool(getattr(namespace, "_not", False))))
        namespace.filters = specs
        namespace._not = False


class _NotAction(argparse.Action):
    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        namespace._not = True


def _enum(enum: Any) -> Callable[[str], int]:
    """Case-insensitive enum value names of a proto enum."""
    def convert(text: str) -> int:
        return int(enum.Value(text.strip().upper()))
    return convert


def _port(text: str) -> int:
    port = int(text)
    if not 0 < port < 65536:
        raise ValueError(text)
    return port


def build_filters(specs: Sequence[FilterSpec]) -> tuple[list[pb.FlowFilter], list[pb.FlowFilter]]:
    """(whitelist, blacklist) from the filter flags, as hubble builds them: one-sided flags go into one
    filter; either-side flags make it two (the value as source in one, as destination in the other)."""
    namespaces = [s.value for s in specs if s.stem == "namespace" and not s.negated]

    def pod(value: str) -> list[str]:  # pods and services: NAME means NAME in -n's namespaces, else default
        if "/" in value:
            return [value]
        return [f"{ns}/{value}" for ns in namespaces] or [f"default/{value}"]

    out: list[list[pb.FlowFilter]] = []
    for negated in (False, True):
        left, right = pb.FlowFilter(), pb.FlowFilter()
        either = False
        for spec in (s for s in specs if s.negated == negated):
            values = pod(spec.value) if spec.stem in ("pod", "service") else [spec.value]
            if spec.side == "":
                getattr(left, spec.stem).extend(values)
                getattr(right, spec.stem).extend(values)
            elif spec.side == "either":
                either = True
                getattr(left, f"source_{spec.stem}").extend(values)
                getattr(right, f"destination_{spec.stem}").extend(values)
            else:
                field_name = f"{'source' if spec.side == 'from' else 'destination'}_{spec.stem}"
                getattr(left, field_name).extend(values)
                getattr(right, field_name).extend(values)
        filters = [left, right] if either else [left]
        out.append([f for f in filters if f.ListFields()])
    return out[0], out[1]


# -- arguments ----------------------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ambit observe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("agents")
    src.add_argument("--server", action="append", default=[], metavar="ADDR",
                     help="an agent's observer: unix socket path or host:port (repeatable; default: the lab's)")
    src.add_argument("--lab", help="lab whose agents to read (default: $AMBIT_LAB, else the only lab)")
    src.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                     help="give up on an agent that has not answered in this time (not with --follow)")
    env = os.environ
    tls = p.add_argument_group("mutual TLS (TCP servers)")
    tls.add_argument("--tls-client-cert-file", default=env.get("AMBIT_TLS_CLIENT_CERT_FILE"), metavar="FILE",
                     help="the operator's certificate (tls.crt of `ambit ca --issue operator`)")
    tls.add_argument("--tls-client-key-file", default=env.get("AMBIT_TLS_CLIENT_KEY_FILE"), metavar="FILE",
                     help="its private key (tls.key)")
    tls.add_argument("--tls-ca-cert-files", action="append", metavar="FILE",
                     default=[f for f in env.get("AMBIT_TLS_CA_CERT_FILES", "").split(",") if f] or None,
                     help="CA certificates the agents' certificate must chain to (ca.crt; repeatable)")
    tls.add_argument("--tls-server-name", default=env.get("AMBIT_TLS_SERVER_NAME") or OBSERVER_SERVER_NAME,
                     metavar="NAME", help="the name the agents' certificate must carry (default %(default)s)")

    sel = p.add_argument_group("selectors")
    sel.add_argument("--last", type=int, metavar="N", help=f"the last N flows (default {DEFAULT_LAST})")
    sel.add_argument("--first", type=int, metavar="N", help="the first N flows in the agents' buffers")
    sel.add_argument("--all", action="store_true", help="every flow in the agents' buffers")
    sel.add_argument("-f", "--follow", action="store_true", help="keep printing new flows")
    sel.add_argument("--since", type=parse_time, metavar="TIME",
                     help="flows since a time: a duration ago (5m, 1h) or RFC 3339")
    sel.add_argument("--until", type=parse_time, metavar="TIME", help="flows until a time (like --since)")

    flt = p.add_argument_group("filters")

    def add(*flags: str, stem: str, side: str, convert: Callable[[str], Any] = str, metavar: str,
            help: str) -> None:
        flt.add_argument(*flags, action=_FilterAction, stem=stem, side=side, convert=convert, metavar=metavar,
                         help=help, dest="filters")

    for stem, meta, convert, what in (
        ("namespace", "NS", str, "Kubernetes namespace"),
        ("pod", "[NS/]POD", str, "pod name prefix (namespace: -n's, else default; /POD: any namespace)"),
        ("ip", "IP", str, "IP address or CIDR"),
        ("port", "PORT", _port, "TCP port"),
        ("label", "K=V", str, "pod label selector: k=v, k, or k=v,k2=v2"),
        ("identity", "ID", str, "SPIFFE ID, ID prefix*, or suffix such as ns/NS/sa/SA"),
        ("service", "[NS/]SVC", str, "Kubernetes Service name prefix (namespace as for pods)"),
    ):
        either = ["-n", "--namespace"] if stem == "namespace" else (["-l", "--label"] if stem == "label"
                                                                     else [f"--{stem}"])
        add(*either, stem=stem, side="either", convert=convert, metavar=meta, help=f"{what}, either side")
        add(f"--from-{stem}", stem=stem, side="from", convert=convert, metavar=meta, help=f"{what} of the source")
        add(f"--to-{stem}", stem=stem, side="to", convert=convert, metavar=meta,
            help=f"{what} of the destination")
    add("--verdict", stem="verdict", side="", convert=_enum(pb.Verdict), metavar="VERDICT",
        help="FORWARDED, DROPPED or ERROR")
    add("--protocol", stem="protocol", side="", convert=str.lower, metavar="PROTO", help="tcp")
    add("-t", "--type", stem="event_type", side="", convert=_enum(pb.EventType), metavar="TYPE",
        help="start, end, drop or kernel")
    add("--traffic-direction", stem="traffic_direction", side="", convert=_enum(pb.TrafficDirection),
        metavar="DIR", help="ingress or egress")
    add("--node-name", stem="node_name", side="", metavar="NODE", help="node name or pattern (node-*)")
    flt.add_argument("--not", action=_NotAction, dest="_not", default=False,
                     help="the next filter flag excludes instead of selects")

    out = p.add_argument_group("output")
    out.add_argument("-o", "--output", choices=FORMATS, default="compact", help="output format (default compact)")
    out.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                     help="colour the verdicts (auto: on a terminal, unless NO_COLOR is set)")
    out.add_argument("--utc", action="store_true", help="print times in UTC instead of local time")
    return p


@dataclass
class Query:
    """What to ask every agent, and how to cut the merged answer."""

    request: pb.GetFlowsRequest
    limit: int | None  # flows to keep after merging (None: all)
    first: bool
    follow: bool
    timeout: float | None
    servers: list[str] = field(default_factory=list)


def query_from_args(args: argparse.Namespace) -> Query:
    chosen = [n for n, v in (("--last", args.last), ("--first", args.first), ("--all", args.all or None))
              if v is not None]
    if len(chosen) > 1:
        raise ObserveError(f"use only one of {', '.join(chosen)}")
    if args.follow and (args.first is not None or args.until is not None):
        raise ObserveError("--follow cannot be combined with --first or --until")
    for flag in ("last", "first"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ObserveError(f"--{flag} needs a number >= 1")
    if args._not:
        raise ObserveError("--not must be followed by a filter flag")
    whitelist, blacklist = build_filters(getattr(args, "filters", None) or [])
    request = pb.GetFlowsRequest(follow=args.follow, whitelist=whitelist, blacklist=blacklist)
    timed = args.since is not None or args.until is not None
    if args.since is not None:
        request.since.CopyFrom(timestamp(int(args.since * 1e9)))
    if args.until is not None:
        request.until.CopyFrom(timestamp(int(args.until * 1e9)))
    if args.since is not None and args.until is not None and args.since > args.until:
        raise ObserveError("--since is after --until")
    limit: int | None
    if args.all:
        limit = None
    elif args.first is not None:
        limit, request.first = args.first, True
    elif args.last is not None:
        limit = args.last
    elif args.follow or timed:
        limit = None  # -f alone: only new flows; --since alone: all of them
    else:
        limit = DEFAULT_LAST
    if args.all:
        request.number = 2**64 - 1
    elif limit is not None:
        request.number = limit
    return Query(request, limit, request.first, args.follow, None if args.follow else args.timeout,
                 list(args.server))


# -- reading ------------------------------------------------------------------------------------------------------
def _nanos(resp: pb.GetFlowsResponse) -> int:
    return resp.time.seconds * 1_000_000_000 + resp.time.nanos


def trim(responses: list[pb.GetFlowsResponse], limit: int | None, first: bool) -> list[pb.GetFlowsResponse]:
    """Keep the first or last ``limit`` flows (lost-event notices inside that span stay)."""
    if limit is None:
        return responses
    count = 0
    order = range(len(responses)) if first else range(len(responses) - 1, -1, -1)
    for i in order:
        if responses[i].HasField("flow"):
            count += 1
            if count == limit:
                return responses[: i + 1] if first else responses[i:]
    return responses


@dataclass
class _Done:
    server: str
    error: str | None = None


async def _read(server: str, request: pb.GetFlowsRequest, rpc_timeout: float | None,
                queue: asyncio.Queue[tuple[str, pb.GetFlowsResponse] | _Done], dial: Dialer) -> None:
    try:
        async with dial.channel(server) as channel:
            stub = pb_grpc.ObserverStub(channel)  # type: ignore[no-untyped-call]
            call = stub.GetFlows(request, timeout=rpc_timeout)
            async for resp in call:
                await queue.put((server, resp))
        await queue.put(_Done(server))
    except grpc.aio.AioRpcError as e:
        hint = ""
        if e.code() == grpc.StatusCode.UNAVAILABLE:
            hint = " (is the agent running there? is the address right?" + (
                ")" if is_unix(server) else " does the TLS handshake fail: a certificate the agent does not "
                "accept, or its certificate not from --tls-ca-cert-files or without --tls-server-name?)")
        await queue.put(_Done(server, f"{e.code().name}{hint}: {e.details()}"))
    except Exception as e:  # a bad address, ...: reported per agent, the others go on
        await queue.put(_Done(server, str(e) or type(e).__name__))


async def observe(servers: Sequence[str], query: Query, printer: Printer, err: TextIO,
                  dial: Dialer | None = None) -> int:
    """Read every agent, print the buffered flows of all of them merged in time order, then (follow) new
    flows as they come. Returns 1 when an agent could not be read, else 0."""
    if not servers:
        raise ObserveError("no agents to read")
    queue: asyncio.Queue[tuple[str, pb.GetFlowsResponse] | _Done] = asyncio.Queue(maxsize=8192)
    tasks = [asyncio.create_task(_read(s, query.request, query.timeout, queue, dial or Dialer())) for s in servers]
    buffered: dict[str, list[pb.GetFlowsResponse]] = {s: [] for s in servers}  # agents still sending history
    history: list[pb.GetFlowsResponse] = []
    early: list[pb.GetFlowsResponse] = []  # new flows of agents done with history while others are not
    printed = False
    live = set(servers)
    failed = 0
    try:
        while live:
            item = await queue.get()
            if isinstance(item, _Done):
                live.discard(item.server)
                history += buffered.pop(item.server, [])
                if item.error is not None:
                    failed += 1
                    err.write(f"ambit observe: {item.server}: {item.error}\n")
                    err.flush()
            else:
                server, resp = item
                if resp.HasField("node_status"):
                    if resp.node_status.state_change == pb.NODE_CONNECTED:
                        history += buffered.pop(server, [])
                elif server in buffered:
                    buffered[server].append(resp)
                elif not printed:
                    early.append(resp)
                else:
                    printer.write(resp)
                    printer.flush()
            if not printed and not buffered:
                history.sort(key=_nanos)  # stable: each agent's own order is kept at equal times
                early.sort(key=_nanos)
                printer.write_all(trim(history, query.limit, query.first) + early)
                printed = True
                if not query.follow:
                    break
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return 1 if failed else 0


def _use_color(choice: str, out: TextIO) -> bool:
    if choice != "auto":
        return choice == "always"
    return out.isatty() and "NO_COLOR" not in os.environ


def main(argv: list[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None,
         labs_root: Path = LABS_ROOT) -> int:
    """Entry point of ``ambit observe``."""
    out = out or sys.stdout
    err = err or sys.stderr
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        query = query_from_args(args)
        servers = query.servers or lab_servers(args.lab, labs_root)
        dial = dialer(args, servers)
    except ObserveError as e:
        err.write(f"ambit observe: {e}\n")
        return 2
    printer = Printer(out, args.output, color=_use_color(args.color, out), tz=dt.UTC if args.utc else None)
    try:
        return asyncio.run(observe(servers, query, printer, err, dial))
    except ObserveError as e:
        err.write(f"ambit observe: {e}\n")
        return 2
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # the reader went away (| head): not an error
        if out is sys.stdout:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
