"""Flow filters with Hubble's semantics, as small composable predicates.

A ``FlowFilter`` (observer.proto) becomes one predicate per set field; within a filter all of them must
hold (AND), a field with several values accepts any of them (OR). A list of filters accepts a flow when
any filter does (OR), and a request's result is the whitelist minus the blacklist.

Bad values (an address that does not parse, an empty label key) raise ``FilterError`` when the predicate
is built, so a server can answer INVALID_ARGUMENT instead of silently matching nothing.
"""

from __future__ import annotations

import fnmatch
import ipaddress
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from agent.telemetry import observer_pb2 as pb
from agent.telemetry.model import Endpoint, Flow

Predicate = Callable[[Flow], bool]
Side = Callable[[Flow], Endpoint]


class FilterError(ValueError):
    """A filter value that cannot be used; the message names it."""


def source(flow: Flow) -> Endpoint:
    return flow.source


def destination(flow: Flow) -> Endpoint:
    return flow.destination


# -- field predicates -------------------------------------------------------------------------------------
def ip_filter(values: Iterable[str], side: Side) -> Predicate:
    """Address equal to one of the values, or inside one of the CIDRs."""
    exact: set[str] = set()
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for value in values:
        try:
            if "/" in value:
                networks.append(ipaddress.ip_network(value, strict=False))
            else:
                exact.add(str(ipaddress.ip_address(value)))
        except ValueError:
            raise FilterError(f"not an IP address or CIDR: {value!r}") from None

    def match(flow: Flow) -> bool:
        ip = side(flow).ip
        if ip in exact:
            return True
        if not networks or not ip:
            return False
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in net for net in networks)

    return match


def pod_filter(values: Iterable[str], side: Side) -> Predicate:
    """ "namespace/name-prefix"; "/prefix" (or a bare "prefix") for any namespace. Address-only endpoints
    never match."""
    full: list[str] = []
    any_ns: list[str] = []
    for value in values:
        if "/" in value and not value.startswith("/"):
            full.append(value)
        else:
            any_ns.append(value.lstrip("/"))
    full_t, any_t = tuple(full), tuple(any_ns)

    def match(flow: Flow) -> bool:
        ep = side(flow)
        if not ep.pod_name:
            return False
        return (bool(full_t) and f"{ep.namespace}/{ep.pod_name}".startswith(full_t)) or \
            (bool(any_t) and ep.pod_name.startswith(any_t))

    return match


def service_filter(values: Iterable[str], side: Side) -> Predicate:
    """ "namespace/name-prefix"; "/prefix" (or a bare "prefix") for any namespace: the Service the flow names
    for that side (the one the client called, for the destination)."""
    full = tuple(v for v in values if "/" in v and not v.startswith("/"))
    any_ns = tuple(v.lstrip("/") for v in values if "/" not in v or v.startswith("/"))

    def match(flow: Flow) -> bool:
        namespace, name = side(flow).service_ref
        if not name:
            return False
        return (bool(full) and f"{namespace}/{name}".startswith(full)) or (bool(any_ns) and name.startswith(any_ns))

    return match


def namespace_filter(values: Iterable[str], side: Side) -> Predicate:
    wanted = frozenset(values)
    return lambda flow: side(flow).namespace in wanted


def parse_selector(value: str) -> tuple[tuple[str, str | None], ...]:
    """ "k=v,k2=v2,k3" -> ((k, v), (k2, v2), (k3, None)); None means "the label is present"."""
    terms = []
    for term in value.split(","):
        key, eq, val = term.strip().partition("=")
        key = key.strip()
        if not key:
            raise FilterError(f"label selector {value!r}: empty label key")
        terms.append((key, val.strip() if eq else None))
    return tuple(terms)


def label_filter(values: Iterable[str], side: Side) -> Predicate:
    """Any of the selectors; a selector needs all of its terms."""
    selectors = [parse_selector(v) for v in values]

    def match(flow: Flow) -> bool:
        labels = side(flow).labels
        return any(all((k in labels) if v is None else labels.get(k) == v for k, v in sel) for sel in selectors)

    return match


def identity_filter(values: Iterable[str], side: Side) -> Predicate:
    """A SPIFFE ID exactly; "prefix*"; or, without a scheme, a path suffix: "ns/web/sa/api", "sa/api"."""
    exact: set[str] = set()
    prefixes: list[str] = []
    suffixes: list[str] = []
    for value in values:
        if not value:
            raise FilterError("empty identity")
        if value.endswith("*"):
            prefixes.append(value[:-1])
        elif value.startswith("spiffe://"):
            exact.add(value)
        else:
            suffixes.append("/" + value.strip("/"))
    pre, suf = tuple(prefixes), tuple(suffixes)

    def match(flow: Flow) -> bool:
        ident = side(flow).identity
        if not ident:
            return False
        return ident in exact or (bool(pre) and ident.startswith(pre)) or (bool(suf) and ident.endswith(suf))

    return match


def port_filter(values: Iterable[int], side: Side) -> Predicate:
    wanted = frozenset(values)
    return lambda flow: side(flow).port in wanted


def node_filter(values: Iterable[str]) -> Predicate:
    """Exact names or shell patterns ("node-*")."""
    exact = {v for v in values if not any(c in v for c in "*?[")}
    patterns = [v for v in values if v not in exact]
    return lambda flow: flow.node_name in exact or any(fnmatch.fnmatchcase(flow.node_name, p) for p in patterns)


def _members(attr: str, values: Iterable[int | str]) -> Predicate:
    wanted = frozenset(values)
    return lambda flow: getattr(flow, attr) in wanted


# FlowFilter field stem -> predicate maker, for the source_* and destination_* fields.
SIDED: dict[str, Callable[[list[Any], Side], Predicate]] = {
    "ip": ip_filter, "pod": pod_filter, "namespace": namespace_filter, "label": label_filter,
    "identity": identity_filter, "port": port_filter, "service": service_filter,
}


# -- whole filters ----------------------------------------------------------------------------------------
def _all(preds: Sequence[Predicate]) -> Predicate:
    if len(preds) == 1:
        return preds[0]
    return lambda flow: all(p(flow) for p in preds)


def _any(preds: Sequence[Predicate]) -> Predicate:
    if len(preds) == 1:
        return preds[0]
    return lambda flow: any(p(flow) for p in preds)


def build(ff: pb.FlowFilter) -> Predicate:
    """The predicate of one FlowFilter: every set field must match. An empty filter matches everything."""
    preds: list[Predicate] = []
    for field, make in SIDED.items():
        for prefix, side in (("source_", source), ("destination_", destination)):
            values = list(getattr(ff, prefix + field))
            if values:
                preds.append(make(values, side))
    if ff.uuid:
        preds.append(_members("uuid", ff.uuid))
    if ff.verdict:
        preds.append(_members("verdict", [int(v) for v in ff.verdict]))
    if ff.protocol:
        preds.append(_members("protocol", [p.lower() for p in ff.protocol]))
    if ff.traffic_direction:
        preds.append(_members("direction", [int(d) for d in ff.traffic_direction]))
    if ff.event_type:
        preds.append(_members("event_type", [int(e) for e in ff.event_type]))
    if ff.node_name:
        preds.append(node_filter(list(ff.node_name)))
    if not preds:
        return lambda _flow: True
    return _all(preds)


def build_any(filters: Iterable[pb.FlowFilter]) -> Predicate | None:
    """Flows that pass any of the filters; None for an empty list."""
    preds = [build(f) for f in filters]
    return _any(preds) if preds else None


def build_request(whitelist: Iterable[pb.FlowFilter], blacklist: Iterable[pb.FlowFilter]) -> Predicate:
    """Allow-list minus deny-list: Hubble's GetFlows semantics."""
    allow = build_any(whitelist)
    deny = build_any(blacklist)
    if allow is None and deny is None:
        return lambda _flow: True
    if deny is None:
        assert allow is not None
        return allow
    if allow is None:
        return lambda flow: not deny(flow)
    return lambda flow: allow(flow) and not deny(flow)
