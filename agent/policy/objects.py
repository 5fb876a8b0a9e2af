"""Reading AuthorizationPolicy and PeerAuthentication objects into typed values, validated with field paths.

The whole of Istio's API (security.istio.io v1 and v1beta1) is read and kept: the selector, targetRef and
targetRefs, every action (AUDIT, and CUSTOM with its provider), rules with every source, operation and
condition field (the HTTP ones too), and PeerAuthentication's modes. Validation follows Istio's (istiod's
webhook): an object with any error is rejected as a whole, each error naming the object and the field path;
an accepted object is one frozen value. What a proxy enforces of it is not decided here: ``l4`` projects
these values onto what ztunnel enforces, and a waypoint would read the same values for HTTP.

Any input is safe: wrong types anywhere, non-string keys, huge numbers or strings, deep nesting and cycles
become errors naming the object and field (or are ignored where Kubernetes ignores them), never exceptions.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.policy import matchers
from agent.policy.model import PolicyError

GROUP = "security.istio.io"
VERSIONS = ("v1", "v1beta1")
AUTHORIZATION_POLICY = "AuthorizationPolicy"
PEER_AUTHENTICATION = "PeerAuthentication"
KINDS = (AUTHORIZATION_POLICY, PEER_AUTHENTICATION)

ALLOW, DENY, AUDIT, CUSTOM = "ALLOW", "DENY", "AUDIT", "CUSTOM"
ACTIONS = (ALLOW, DENY, AUDIT, CUSTOM)
STRICT, PERMISSIVE, DISABLE, UNSET = "STRICT", "PERMISSIVE", "DISABLE", "UNSET"
MODES = (UNSET, DISABLE, PERMISSIVE, STRICT)

_AP_SPEC = ("selector", "targetRef", "targetRefs", "action", "provider", "rules")
_PA_SPEC = ("selector", "mtls", "portLevelMtls")
_SELECTOR = ("matchLabels",)
_TARGET_REF = ("group", "kind", "name", "namespace")
# what targetRefs may name (group, kind), as Istio's webhook allows
_TARGET_KINDS = (("core", "Service"), ("networking.istio.io", "ServiceEntry"),
                 ("gateway.networking.k8s.io", "Gateway"), ("gateway.networking.k8s.io", "GatewayClass"))
_PROVIDER = ("name",)
_RULE = ("from", "to", "when")
_SOURCE = ("principals", "notPrincipals", "requestPrincipals", "notRequestPrincipals", "namespaces",
           "notNamespaces", "serviceAccounts", "notServiceAccounts", "ipBlocks", "notIpBlocks", "remoteIpBlocks",
           "notRemoteIpBlocks")
_OPERATION = ("hosts", "notHosts", "ports", "notPorts", "methods", "notMethods", "paths", "notPaths")
_CONDITION = ("key", "values", "notValues")
_MTLS = ("mode",)
_SERVICE_ACCOUNTS_MAX, _SERVICE_ACCOUNT_LENGTH_MAX = 16, 320  # Istio's limits
_PCHARS = re.compile(r"[a-zA-Z0-9\-._~%!$&'()+,;:@=]+")  # RFC 3986 pchars: path template literals

# ``when`` keys: plain ones, and the ones with an item in brackets (request.headers[User-Agent])
_WHEN_KEYS = ("source.ip", "source.namespace", "source.principal", "source.serviceAccount", "destination.ip",
              "destination.port", "remote.ip", "request.auth.principal", "request.auth.audiences",
              "request.auth.presenter", "connection.sni")
_WHEN_MAPS = ("request.headers", "request.experimental.inline.headers", "request.auth.claims",
              "experimental.envoy.filters.")
_WHEN_REPLACED = {
    "destination.namespace": "is replaced by the policy's metadata.namespace",
    "destination.name": "is only supported in v1alpha1",
    "destination.user": "is only supported in v1alpha1",
}
_CUSTOM_UNSUPPORTED_SOURCE = ("principals", "notPrincipals", "requestPrincipals", "notRequestPrincipals",
                              "namespaces", "notNamespaces", "serviceAccounts", "notServiceAccounts")
_CUSTOM_UNSUPPORTED_WHEN = ("source.namespace", "source.serviceAccount", "source.principal")

Note = tuple[int, str]  # (logging level, text): what is worth saying about an accepted object
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Labels = frozenset[tuple[str, str]]

# -- the values ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Meta:
    """Who an object is: kind, namespace (``default`` when left out), name, and its creationTimestamp."""

    kind: str
    namespace: str
    name: str
    created: float = 0.0  # seconds since the epoch; 0 (the oldest) if absent or unreadable

    @property
    def ref(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class TargetRef:
    """A targetRef(s) entry: what a waypoint or gateway applies the policy to (in the policy's namespace)."""

    group: str  # as written: "" (or "core") is the core group
    kind: str
    name: str


@dataclass(frozen=True, slots=True)
class ServiceAccount:
    namespace: str  # written ``ns/sa``, or a bare ``sa`` in the policy's namespace
    name: str


@dataclass(frozen=True, slots=True)
class Source:
    """A ``from[].source``: every field set must match. An empty tuple is a field left out (Istio reads
    an empty list as unset)."""

    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    request_principals: tuple[str, ...] = ()
    not_request_principals: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()
    service_accounts: tuple[ServiceAccount, ...] = ()
    not_service_accounts: tuple[ServiceAccount, ...] = ()
    ip_blocks: tuple[Network, ...] = ()
    not_ip_blocks: tuple[Network, ...] = ()
    remote_ip_blocks: tuple[Network, ...] = ()
    not_remote_ip_blocks: tuple[Network, ...] = ()


@dataclass(frozen=True, slots=True)
class Operation:
    """A ``to[].operation``: every field set must match; an empty tuple is a field left out."""

    hosts: tuple[str, ...] = ()
    not_hosts: tuple[str, ...] = ()
    ports: tuple[int, ...] = ()
    not_ports: tuple[int, ...] = ()
    methods: tuple[str, ...] = ()
    not_methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    not_paths: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Condition:
    """A ``when[]`` entry. Values are kept as written (strings), validated for the key: IP blocks for
    ``*.ip``, ports for ``destination.port``, ``ns/sa`` for ``source.serviceAccount``."""

    key: str  # as written: "request.headers[User-Agent]"
    attribute: str  # the key without its item: "request.headers"
    item: str | None  # what is in the brackets: "User-Agent"; None for plain keys
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Rule:
    """One of ``spec.rules``: a ``from`` source, a ``to`` operation and every ``when`` condition must match;
    an empty tuple places no condition (``from``/``to`` left out, as an empty one is an error)."""

    sources: tuple[Source, ...] = ()
    operations: tuple[Operation, ...] = ()
    conditions: tuple[Condition, ...] = ()


@dataclass(frozen=True)
class AuthorizationPolicy:
    """An accepted AuthorizationPolicy, whole."""

    meta: Meta
    action: str  # ALLOW, DENY, AUDIT or CUSTOM
    selector: Labels | None = None  # None: no labels, so every workload in scope
    target_refs: tuple[TargetRef, ...] = ()  # targetRef and targetRefs together: for waypoints and gateways
    provider: str | None = None  # CUSTOM's provider.name
    rules: tuple[Rule, ...] = ()
    notes: tuple[Note, ...] = ()

    @property
    def namespace(self) -> str:
        return self.meta.namespace

    @property
    def name(self) -> str:
        return self.meta.name

    @property
    def ref(self) -> str:
        return self.meta.ref


@dataclass(frozen=True)
class PeerAuthentication:
    """An accepted PeerAuthentication. Modes are as written (DISABLE included)."""

    meta: Meta
    selector: Labels | None  # None: no labels, so the whole namespace (the mesh, from the root namespace)
    mode: str
    ports: Mapping[int, str] = field(default_factory=dict)  # portLevelMtls
    notes: tuple[Note, ...] = ()

    @property
    def namespace(self) -> str:
        return self.meta.namespace

    @property
    def name(self) -> str:
        return self.meta.name

    @property
    def ref(self) -> str:
        return self.meta.ref

    @property
    def age(self) -> tuple[float, str]:
        """(creationTimestamp, name): the smaller is older."""
        return (self.meta.created, self.meta.name)


Policy = AuthorizationPolicy | PeerAuthentication


@dataclass
class Read:
    """The outcome of reading one object: its value, or the errors that reject it."""

    ref: str
    value: Policy | None = None
    errors: list[PolicyError] = field(default_factory=list)


@dataclass
class PolicySet:
    """The accepted objects of a set (the first of each name), and the rejections."""

    values: list[Policy] = field(default_factory=list)
    errors: list[PolicyError] = field(default_factory=list)


# -- showing what was found -------------------------------------------------------------------------------

_SHOWN = 80  # characters of a value shown in a message
_SEGMENT = 100  # characters of a key shown in a field path
_INT_BITS_SHOWN = 256  # larger integers are described, not written out


def _show(value: Any) -> str:
    """``value`` as JSON-like text for a message, at most 80 characters, whatever it holds (non-string keys,
    huge integers, deep nesting, cycles)."""
    text = _render(value, _SHOWN + 1)
    return text if len(text) <= _SHOWN else text[:_SHOWN - 3] + "..."


_NO_KEY = object()


def _render(value: Any, budget: int) -> str:
    """JSON-like text of ``value``, cut short once longer than ``budget``: each level of nesting costs at
    least one character, so the recursion is at most ``budget`` deep."""
    if isinstance(value, str):
        return json.dumps(value[:budget])
    if value is None or isinstance(value, bool | float):
        return json.dumps(value)
    if isinstance(value, int):
        return str(value) if value.bit_length() <= _INT_BITS_SHOWN else f"<an integer of {value.bit_length()} bits>"
    if isinstance(value, Mapping):
        return "{" + _render_items(((k, v) for k, v in value.items()), budget) + "}"
    if isinstance(value, list | tuple | set | frozenset):
        return "[" + _render_items(((_NO_KEY, v) for v in value), budget) + "]"
    return json.dumps(str(value)[:budget])


def _render_items(items: Iterable[tuple[Any, Any]], budget: int) -> str:
    """The entries of a mapping (key, value) or of a list (_NO_KEY, value), within ``budget``."""
    parts: list[str] = []
    used = 2
    for key, inner in items:
        if used > budget:
            parts.append("...")
            break
        text = ""
        if key is not _NO_KEY:
            text = _render(key, budget - used)
            text = (text if text.startswith('"') else json.dumps(text)) + ": "
        text += _render(inner, budget - used - len(text))
        parts.append(text)
        used += len(text) + 2
    return ", ".join(parts)


def _segment(key: Any) -> str:
    """A mapping key as a field path segment: short keys as they are, long or odd ones shown."""
    if isinstance(key, str):
        if not key:
            return '""'
        return key if len(key) <= _SEGMENT else key[:_SEGMENT - 3] + "..."
    if isinstance(key, int) and not isinstance(key, bool) and key.bit_length() <= _INT_BITS_SHOWN:
        return str(key)
    return _show(key)


def _type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return type(value).__name__


def port_number(value: Any) -> int | None:
    """A port from a numeric string (or, for map keys, an integer) in 1..65535, else None."""
    if isinstance(value, str) and value.isascii() and value.isdigit():
        digits = value.lstrip("0")
        if len(digits) > 5:  # too large, and int() refuses strings of over 4300 digits
            return None
        number = int(digits or "0")
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        return None
    return number if 1 <= number <= 65535 else None


def _given(m: Mapping[str, Any], key: str) -> Any:
    """``m[key]`` unless it is absent, null or an empty list (which Istio reads as unset)."""
    value = m.get(key)
    return None if value is None or (isinstance(value, list | tuple) and not value) else value


# -- reading ------------------------------------------------------------------------------------------------


class _Reader:
    """Walks one object's spec, collecting errors against field paths, and notes."""

    def __init__(self, ref: str) -> None:
        self.ref = ref
        self.errors: list[PolicyError] = []
        self.notes: list[Note] = []

    def error(self, path: str, message: str) -> None:
        self.errors.append(PolicyError(self.ref, path, message))

    def mapping(self, value: Any, path: str, fields: Collection[str] | None,
                string_keys: bool = True) -> Mapping[Any, Any] | None:
        """``value`` as a mapping with only ``fields`` (None: any keys, strings unless not
        ``string_keys``); None if null or wrong."""
        if value is None:
            return None
        if not isinstance(value, Mapping):
            self.error(path, f"must be a mapping, not {_type(value)}")
            return None
        for key in value:
            if not isinstance(key, str):
                if not string_keys:
                    continue
                self.error(path, f"keys must be strings, not {_type(key)} {_show(key)}")
            elif fields is not None and key not in fields:
                self.error(f"{path}.{_segment(key)}", f"unknown field (known here: {', '.join(fields)})")
        return value

    def required(self, value: Any, path: str, fields: Collection[str]) -> Mapping[Any, Any] | None:
        """Like ``mapping``, but null is an error too."""
        if value is None:
            self.error(path, "must be set")
            return None
        return self.mapping(value, path, fields)

    def items(self, value: Any, path: str) -> list[Any] | None:
        """``value`` as a list; None if null (absent) or not a list."""
        if value is None:
            return None
        if not isinstance(value, list | tuple):
            self.error(path, f"must be a list, not {_type(value)}")
            return None
        return list(value)

    def indexed(self, value: Any, path: str) -> list[tuple[int, str]]:
        """A list of non-empty strings (absent: empty), each with its index; wrong entries are reported and
        left out."""
        out: list[tuple[int, str]] = []
        for i, item in enumerate(self.items(value, path) or ()):
            if not isinstance(item, str):
                hint = (f" (quote it: {json.dumps(_show(item))})" if isinstance(item, int | float)
                        and not isinstance(item, bool) else "")
                self.error(f"{path}[{i}]", f"must be a string, not {_type(item)}{hint}")
            elif not item:
                self.error(f"{path}[{i}]", "must not be empty")
            else:
                out.append((i, item))
        return out

    def text(self, value: Any, path: str) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str):
            self.error(path, f"must be a string, not {_type(value)}")
            return None
        return value

    # -- typed lists, from ``indexed`` ------------------------------------------------------------------

    def patterns(self, values: list[tuple[int, str]], path: str, principals: bool = False) -> tuple[str, ...]:
        """Istio string patterns (exact, ``x*``, ``*x``, ``*``), noting the ones that never match."""
        for i, v in values:
            if "*" in v[1:-1] or v == "**":
                self.notes.append((logging.WARNING, f"{self.ref}: {path}[{i}] {_show(v)}: '*' only works as the "
                                   "whole value, a prefix (x*) or a suffix (*x); elsewhere it is matched literally"))
            if principals and v.startswith("spiffe://"):
                self.notes.append((logging.WARNING, f"{self.ref}: {path}[{i}] {_show(v)}: principals are written "
                                   "without spiffe:// (cluster.local/ns/NS/sa/SA); this one never matches"))
        return tuple(v for _, v in values)

    def blocks(self, values: list[tuple[int, str]], path: str) -> tuple[Network, ...]:
        """IP blocks of either family, noting the IPv4-mapped ones (they match no connection, as in Istio)."""
        networks = []
        for i, v in values:
            try:
                block = matchers.parse_block(v)
            except ValueError:
                what = "a CIDR" if "/" in v else "an IP address or CIDR"
                self.error(f"{path}[{i}]", f"{_show(v)} is not {what}")
                continue
            networks.append(block)
            if matchers.ipv4_mapped(block):
                ipv4 = ipaddress.ip_network((int(block.network_address) & 0xFFFFFFFF, block.prefixlen - 96))
                self.notes.append((logging.WARNING, f"{self.ref}: {path}[{i}] {_show(v)} is IPv4-mapped: a "
                                   "connection's IPv4 address is matched as IPv4, so this block matches none (as "
                                   f"in Istio); write {ipv4}"))
        return tuple(networks)

    def ports(self, values: list[tuple[int, str]], path: str) -> tuple[int, ...]:
        out = []
        for i, v in values:
            port = port_number(v)
            if port is None:
                self.error(f"{path}[{i}]", f"{_show(v)} is not a port (a number in 1..65535, as a string)")
            else:
                out.append(port)
        return tuple(out)

    def accounts(self, values: list[tuple[int, str]], path: str, namespace: str) -> tuple[ServiceAccount, ...]:
        """``ns/sa`` (or ``sa``, in the policy's namespace), as Istio's webhook checks them."""
        if len(values) > _SERVICE_ACCOUNTS_MAX:
            self.error(path, f"may not have more than {_SERVICE_ACCOUNTS_MAX} values")
        out = []
        for i, v in values:
            ns, slash, sa = v.partition("/")
            if not slash:
                ns, sa = namespace, v
            if not ns or not sa or "/" in sa or "*" in v:
                self.error(f"{path}[{i}]", f"{_show(v)} is not a service account (namespace/name, no wildcards)")
            elif len(v) > _SERVICE_ACCOUNT_LENGTH_MAX:
                self.error(f"{path}[{i}]", f"must be at most {_SERVICE_ACCOUNT_LENGTH_MAX} characters")
            else:
                out.append(ServiceAccount(ns, sa))
        return tuple(out)

    def paths(self, values: list[tuple[int, str]], path: str) -> tuple[str, ...]:
        """HTTP paths; ``{*}`` and ``{**}`` segments are path templates, checked as Istio's webhook does."""
        for i, v in values:
            problem = _path_template_problem(v)
            if problem:
                self.error(f"{path}[{i}]", f"{_show(v)}: {problem}")
        return tuple(v for _, v in values)

    def selector(self, value: Any, path: str) -> Labels | None:
        """``matchLabels`` as a set of items; None for no selector or one with no labels."""
        selector = self.mapping(value, path, _SELECTOR)
        if selector is None:
            return None
        labels = self.mapping(selector.get("matchLabels"), f"{path}.matchLabels", None)
        if not labels:
            return None
        out = set()
        for k, v in labels.items():
            if not isinstance(k, str):
                continue  # reported by mapping()
            where = f"{path}.matchLabels.{_segment(k)}"
            if not isinstance(v, str):
                self.error(where, f"label values must be strings, not {_type(v)}")
            elif k == "" or "*" in k or "*" in v:
                self.error(where, "empty keys and wildcards are not supported in selectors")
            else:
                out.add((k, v))
        return frozenset(out)

    def target_refs(self, spec: Mapping[str, Any]) -> tuple[TargetRef, ...]:
        refs: list[tuple[str, Any]] = []
        if spec.get("targetRef") is not None:
            refs.append(("spec.targetRef", spec["targetRef"]))
        for i, ref in enumerate(self.items(spec.get("targetRefs"), "spec.targetRefs") or ()):
            refs.append((f"spec.targetRefs[{i}]", ref))
        out = []
        for path, ref in refs:
            m = self.required(ref, path, _TARGET_REF)
            if m is None:
                continue
            group, kind, name, namespace = (self.text(m.get(key), f"{path}.{key}") for key in _TARGET_REF)
            for key, given in (("kind", kind), ("name", name)):
                if not given:
                    self.error(f"{path}.{key}", "must be set")
            if namespace:
                self.error(f"{path}.namespace", "must not be set: cross-namespace references are not supported")
            if kind and (group or "core", kind) not in _TARGET_KINDS:
                known = ", ".join(f"{g}/{k}" for g, k in _TARGET_KINDS)
                self.error(f"{path}.kind", f"{_show(kind)} in group {_show(group or 'core')} cannot be targeted "
                                           f"(only {known})")
            out.append(TargetRef(group or "", kind or "", name or ""))
        return tuple(out)


def _path_template_problem(path: str) -> str | None:
    """What is wrong with a path using ``{*}``/``{**}`` templates, as Istio's webhook says; None if fine."""
    has_template = "{*}" in path or "{**}" in path
    found_any = False
    for glob in path.strip("/").split("/"):
        if glob in ("{*}", "{**}"):
            if found_any:
                return "{**} must be the last operator of a path template"
            found_any = glob == "{**}"
            continue
        if "{" in glob or "}" in glob:
            return "'{' and '}' are only allowed in the path templates {*} and {**}"
        if has_template and not _PCHARS.fullmatch(glob):
            return f"segment {_show(glob)} of a path template has characters other than RFC 3986 pchars"
    return None



# -- metadata ---------------------------------------------------------------------------------------------


def _metadata(obj: Mapping[Any, Any], kind: str) -> tuple[Meta, list[PolicyError]]:
    """Who the object is, and what is wrong with its metadata. A namespace left out is ``default`` (as
    kubectl applies it); one given must be a non-empty string."""
    meta = obj.get("metadata")
    problems: list[tuple[str, str]] = []
    if meta is None:
        meta = {}
    elif not isinstance(meta, Mapping):
        problems.append(("metadata", f"must be a mapping, not {_type(meta)}"))
        meta = {}
    name, namespace = meta.get("name"), meta.get("namespace")
    if namespace is None:
        namespace = "default"
    if not isinstance(name, str) or not name:
        problems.append(("metadata.name", "must be a non-empty string"))
        name = "?"
    if not isinstance(namespace, str) or not namespace:
        problems.append(("metadata.namespace", f"must be a non-empty string, not {_type(namespace)} "
                                               f"{_show(namespace)}"))
        namespace = "?"
    found = Meta(kind, namespace, name, _created(meta.get("creationTimestamp")))
    return found, [PolicyError(found.ref, path, message) for path, message in problems]


def _created(value: Any) -> float:
    """A creationTimestamp (RFC 3339 text, or a datetime from an unquoted YAML timestamp) as seconds since
    the epoch; 0 (the oldest) if absent or unreadable."""
    when: datetime.datetime
    if isinstance(value, datetime.datetime):
        when = value
    elif isinstance(value, str):
        try:
            when = datetime.datetime.fromisoformat(value)
        except ValueError:
            return 0.0
    else:
        return 0.0
    return (when if when.tzinfo is not None else when.replace(tzinfo=datetime.UTC)).timestamp()


# -- AuthorizationPolicy --------------------------------------------------------------------------------


class _PolicyReader(_Reader):
    def __init__(self, ref: str, namespace: str) -> None:
        super().__init__(ref)
        self.namespace = namespace
        self.action = ALLOW

    def source(self, value: Any, path: str) -> Source | None:
        src = self.required(value, path, _SOURCE)
        if src is None:
            return None
        given = {k for k in _SOURCE if _given(src, k) is not None}
        if not given:
            self.error(path, "must not be empty")
        if ({"serviceAccounts", "notServiceAccounts"} & given
                and {"principals", "notPrincipals", "namespaces", "notNamespaces"} & given):
            self.error(path, "serviceAccounts cannot be set with namespaces or principals")
        if self.action == CUSTOM:
            for key in _CUSTOM_UNSUPPORTED_SOURCE:
                if key in given:
                    self.error(f"{path}.{key}", "is not supported with action CUSTOM")

        def at(key: str) -> tuple[list[tuple[int, str]], str]:
            return self.indexed(_given(src, key), f"{path}.{key}"), f"{path}.{key}"

        return Source(
            principals=self.patterns(*at("principals"), principals=True),
            not_principals=self.patterns(*at("notPrincipals"), principals=True),
            request_principals=self.patterns(*at("requestPrincipals")),
            not_request_principals=self.patterns(*at("notRequestPrincipals")),
            namespaces=self.patterns(*at("namespaces")),
            not_namespaces=self.patterns(*at("notNamespaces")),
            service_accounts=self.accounts(*at("serviceAccounts"), self.namespace),
            not_service_accounts=self.accounts(*at("notServiceAccounts"), self.namespace),
            ip_blocks=self.blocks(*at("ipBlocks")),
            not_ip_blocks=self.blocks(*at("notIpBlocks")),
            remote_ip_blocks=self.blocks(*at("remoteIpBlocks")),
            not_remote_ip_blocks=self.blocks(*at("notRemoteIpBlocks")),
        )

    def operation(self, value: Any, path: str) -> Operation | None:
        op = self.required(value, path, _OPERATION)
        if op is None:
            return None
        if all(_given(op, k) is None for k in _OPERATION):
            self.error(path, "must not be empty")

        def at(key: str) -> tuple[list[tuple[int, str]], str]:
            return self.indexed(_given(op, key), f"{path}.{key}"), f"{path}.{key}"

        def strings(key: str) -> tuple[str, ...]:
            return tuple(v for _, v in at(key)[0])

        return Operation(
            hosts=strings("hosts"), not_hosts=strings("notHosts"),
            ports=self.ports(*at("ports")), not_ports=self.ports(*at("notPorts")),
            methods=strings("methods"), not_methods=strings("notMethods"),
            paths=self.paths(*at("paths")), not_paths=self.paths(*at("notPaths")),
        )

    def condition(self, value: Any, path: str) -> Condition | None:
        cond = self.required(value, path, _CONDITION)
        if cond is None:
            return None
        key = self.text(cond.get("key"), f"{path}.key")
        if not key:
            if key is not None or "key" not in cond:
                self.error(f"{path}.key", "must be set")
            return None
        if _given(cond, "values") is None and _given(cond, "notValues") is None:
            self.error(path, f"at least one of values or notValues must be set for key {_show(key)}")
        attribute, item = key, None
        if key.startswith(_WHEN_MAPS):
            opening = key.find("[")
            if key.endswith("]") and 0 < opening < len(key) - 2:
                attribute, item = key[:opening], key[opening + 1:-1]
            else:
                self.error(f"{path}.key", f"{_show(key)} should have the form name[item]")
        elif key.startswith("destination.labels"):
            self.error(f"{path}.key", f"{_show(key)} is replaced by the workload selector")
        elif key in _WHEN_REPLACED:
            self.error(f"{path}.key", f"{_show(key)} {_WHEN_REPLACED[key]}")
        elif key not in _WHEN_KEYS:
            self.error(f"{path}.key", f"unknown attribute {_show(key)}")
        if self.action == CUSTOM and (key in _CUSTOM_UNSUPPORTED_WHEN or key.startswith("request.auth.")):
            self.error(f"{path}.key", f"{_show(key)} is not supported with action CUSTOM")
        parts = []
        for part in ("values", "notValues"):
            where = f"{path}.{part}"
            values = self.indexed(_given(cond, part), where)
            if key in ("source.ip", "destination.ip", "remote.ip"):
                self.blocks(values, where)
            elif key == "destination.port":
                self.ports(values, where)
            elif key == "source.serviceAccount":
                self.accounts(values, where, self.namespace)
            elif key in ("source.namespace", "source.principal"):
                self.patterns(values, where, principals=key == "source.principal")
            parts.append(tuple(v for _, v in values))
        return Condition(key, attribute, item, parts[0], parts[1])

    def entries(self, value: Any, path: str, entry: str) -> list[Any]:
        """A ``from`` or ``to`` list: its sources or operations (none if absent)."""
        items = self.items(value, path)
        if items is None:
            return []
        if not items:
            self.error(path, "must not be empty (leave it out to place no condition)")
            return []
        found = []
        for i, item in enumerate(items):
            m = self.required(item, f"{path}[{i}]", (entry,))
            if m is None:
                continue
            where = f"{path}[{i}].{entry}"
            parsed = self.source(m.get(entry), where) if entry == "source" else self.operation(m.get(entry), where)
            if parsed is not None:
                found.append(parsed)
        return found

    def rule(self, value: Any, index: int) -> Rule | None:
        path = f"spec.rules[{index}]"
        if value is None:
            self.error(path, "must not be null (a rule matching everything is {})")
            return None
        rule = self.mapping(value, path, _RULE)
        if rule is None:
            return None
        conditions = (self.condition(c, f"{path}.when[{i}]")
                      for i, c in enumerate(self.items(rule.get("when"), f"{path}.when") or ()))
        return Rule(tuple(self.entries(rule.get("from"), f"{path}.from", "source")),
                    tuple(self.entries(rule.get("to"), f"{path}.to", "operation")),
                    tuple(c for c in conditions if c is not None))


def read_authorization_policy(obj: Mapping[Any, Any]) -> Read:
    """Validate and read one AuthorizationPolicy object."""
    meta, errors = _metadata(obj, AUTHORIZATION_POLICY)
    reader = _PolicyReader(meta.ref, meta.namespace)
    reader.errors += errors
    spec = reader.mapping(obj.get("spec"), "spec", _AP_SPEC) or {}

    action = spec.get("action")
    if action is None or action == "":
        action = ALLOW
    elif action not in ACTIONS:
        reader.error("spec.action", f"unknown action {_show(action)} (expected one of {', '.join(ACTIONS)})")
    else:
        reader.action = action
    provider_spec = reader.mapping(spec.get("provider"), "spec.provider", _PROVIDER)
    provider = reader.text(provider_spec.get("name"), "spec.provider.name") if provider_spec is not None else None
    if spec.get("provider") is not None and action != CUSTOM:
        reader.error("spec.provider", "is only valid with action CUSTOM")

    selector = reader.selector(spec.get("selector"), "spec.selector")
    target_refs = reader.target_refs(spec)
    if target_refs and spec.get("selector") is not None:
        reader.error("spec", "only one of selector or targetRefs can be set")

    raw_rules = reader.items(spec.get("rules"), "spec.rules")
    if action == DENY and not raw_rules:
        reader.error("spec.rules", "a DENY policy without rules never applies; add an empty rule {} to deny "
                                   "everything in its scope")
    elif action == CUSTOM and not raw_rules:
        reader.error("spec.rules", "a CUSTOM policy without rules never applies; add an empty rule {} to apply "
                                   "it to everything in its scope")
    elif action == CUSTOM and not provider:
        reader.error("spec.provider.name", "must be set with action CUSTOM")
    rules = tuple(rule for i, raw in enumerate(raw_rules or ()) if (rule := reader.rule(raw, i)) is not None)

    if reader.errors:
        return Read(meta.ref, errors=reader.errors)
    return Read(meta.ref, AuthorizationPolicy(meta, reader.action, selector, target_refs, provider, rules,
                                              tuple(reader.notes)))


# -- PeerAuthentication ---------------------------------------------------------------------------------


def _mode(reader: _Reader, value: Any, path: str) -> str:
    mtls = reader.mapping(value, path, _MTLS)
    if mtls is None:
        return UNSET
    mode = mtls.get("mode")
    if mode is None or mode == "":
        return UNSET
    if mode not in MODES:
        reader.error(f"{path}.mode", f"unknown mode {_show(mode)} (expected one of {', '.join(MODES)})")
        return UNSET
    return str(mode)


def read_peer_authentication(obj: Mapping[Any, Any]) -> Read:
    """Validate and read one PeerAuthentication object."""
    meta, errors = _metadata(obj, PEER_AUTHENTICATION)
    reader = _Reader(meta.ref)
    reader.errors += errors
    spec = reader.mapping(obj.get("spec"), "spec", _PA_SPEC) or {}
    selector = reader.selector(spec.get("selector"), "spec.selector")
    mode = _mode(reader, spec.get("mtls"), "spec.mtls")
    ports: dict[int, str] = {}
    raw_ports = reader.mapping(spec.get("portLevelMtls"), "spec.portLevelMtls", None, string_keys=False)
    if raw_ports is not None:
        if selector is None:
            reader.error("spec.portLevelMtls", "is only allowed with a selector (mesh-wide and namespace-wide "
                                               "PeerAuthentications cannot have port-level mTLS)")
        if not raw_ports:
            reader.error("spec.portLevelMtls", "if set, must have at least one port")
        for key, value in raw_ports.items():
            path = f"spec.portLevelMtls.{_segment(key)}"
            port = port_number(key)
            if port is None:
                reader.error(path, f"{_show(key)} is not a port (1..65535)")
                continue
            ports[port] = _mode(reader, value, path)
    if reader.errors:
        return Read(meta.ref, errors=reader.errors)
    return Read(meta.ref, PeerAuthentication(meta, selector, mode, ports, tuple(reader.notes)))


# -- any object ---------------------------------------------------------------------------------------------


def read(obj: Mapping[Any, Any]) -> Read | None:
    """Read an AuthorizationPolicy or PeerAuthentication; None for any other kind of object."""
    kind = obj.get("kind")
    if not isinstance(kind, str) or kind not in KINDS:
        return None
    reading = read_authorization_policy if kind == AUTHORIZATION_POLICY else read_peer_authentication
    api = obj.get("apiVersion")
    if api is not None:
        if not isinstance(api, str):
            return Read(f"{kind} ?", errors=[PolicyError(f"{kind} ?", "apiVersion", "must be a string")])
        group, _, version = api.rpartition("/")
        if group != GROUP:
            return None  # another API group's kind of the same name
        if version not in VERSIONS:
            result = reading(obj)
            error = PolicyError(result.ref, "apiVersion",
                                f"unsupported version {_show(version)} (expected {' or '.join(VERSIONS)})")
            return Read(result.ref, errors=[error, *result.errors])
    return reading(obj)


def read_all(objects: Iterable[Any]) -> PolicySet:
    """Read every AuthorizationPolicy and PeerAuthentication among ``objects`` (anything else is ignored):
    the accepted ones, the first of each name, and the rejections in object order."""
    out = PolicySet()
    seen: set[str] = set()
    for obj in objects:
        if not isinstance(obj, Mapping):
            continue
        result = read(obj)
        if result is None:
            continue
        if result.errors:
            out.errors += result.errors
        elif result.ref in seen:
            out.errors.append(PolicyError(result.ref, "", "given more than once; the first one is in force"))
        elif result.value is not None:
            seen.add(result.ref)
            out.values.append(result.value)
    return out
