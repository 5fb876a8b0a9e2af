"""Reading AuthorizationPolicy and PeerAuthentication objects: validation with field paths, then compilation.

Validation follows Istio's (istiod's webhook and its ambient translation): an object with any error is
rejected as a whole, each error naming the object and the field path. What is accepted is compiled once
into conditions (see ``matchers``) with ready-made decisions, which ``compiler`` turns into code.

L4 semantics of the parts ztunnel cannot see (HTTP attributes): an ALLOW rule using any of them never
matches; a DENY rule is enforced without them, so a source or an operation left with no L4 field matches
everything, and a ``when`` condition on an HTTP attribute is dropped. Each such policy gets a note.
"""

from __future__ import annotations

import datetime
import json
import logging
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.policy import matchers
from agent.policy.matchers import Alternative, Check, Clause, Condition, IpSet, StringSet
from agent.policy.model import Decision, PolicyError

GROUP = "security.istio.io"
VERSIONS = ("v1", "v1beta1")
AUTHORIZATION_POLICY = "AuthorizationPolicy"
PEER_AUTHENTICATION = "PeerAuthentication"
KINDS = (AUTHORIZATION_POLICY, PEER_AUTHENTICATION)

ALLOW, DENY = "ALLOW", "DENY"
STRICT, PERMISSIVE, DISABLE, UNSET = "STRICT", "PERMISSIVE", "DISABLE", "UNSET"
MODES = (UNSET, DISABLE, PERMISSIVE, STRICT)

_AP_SPEC = ("selector", "targetRef", "targetRefs", "action", "provider", "rules")
_PA_SPEC = ("selector", "mtls", "portLevelMtls")
_SELECTOR = ("matchLabels",)
_TARGET_REF = ("group", "kind", "name", "namespace")
_RULE = ("from", "to", "when")
_SOURCE_L4 = ("principals", "notPrincipals", "namespaces", "notNamespaces", "serviceAccounts",
              "notServiceAccounts", "ipBlocks", "notIpBlocks")
_SOURCE_L7 = ("requestPrincipals", "notRequestPrincipals", "remoteIpBlocks", "notRemoteIpBlocks")
_OPERATION_L4 = ("ports", "notPorts")
_OPERATION_L7 = ("hosts", "notHosts", "methods", "notMethods", "paths", "notPaths")
_CONDITION = ("key", "values", "notValues")
_MTLS = ("mode",)

_WHEN_L4 = ("source.ip", "source.namespace", "source.principal", "destination.ip", "destination.port")
_WHEN_L7 = ("remote.ip", "request.auth.principal", "request.auth.audiences", "request.auth.presenter",
            "connection.sni")
_WHEN_L7_MAPS = ("request.headers", "request.auth.claims", "experimental.envoy.filters.")
_WHEN_REPLACED = {
    "destination.namespace": "is replaced by the policy's metadata.namespace",
    "destination.name": "is only supported in v1alpha1",
    "destination.user": "is only supported in v1alpha1",
}


Note = tuple[int, str]  # (logging level, text): what is worth saying about an accepted object


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule as enforced at L4: its index in ``spec.rules``, its condition, and the decision when it holds."""

    index: int
    condition: Condition
    decision: Decision


@dataclass(frozen=True)
class AuthorizationPolicy:
    """An accepted AuthorizationPolicy, compiled."""

    namespace: str
    name: str
    action: str
    selector: frozenset[tuple[str, str]] | None  # None: every workload in scope
    rules: tuple[Rule, ...]  # the rules that can match at L4, in order
    targeted: bool  # has targetRefs: for waypoints, not enforced here
    notes: tuple[Note, ...] = ()

    @property
    def ref(self) -> str:
        return f"{AUTHORIZATION_POLICY} {self.namespace}/{self.name}"


@dataclass(frozen=True)
class PeerAuthentication:
    """An accepted PeerAuthentication. Modes are as written (DISABLE included); the engine reads DISABLE
    as PERMISSIVE."""

    namespace: str
    name: str
    selector: frozenset[tuple[str, str]] | None
    mode: str
    ports: Mapping[int, str] = field(default_factory=dict)
    age: tuple[float, str] = (0.0, "")  # (creationTimestamp, name): the smaller is older
    notes: tuple[Note, ...] = ()

    @property
    def ref(self) -> str:
        return f"{PEER_AUTHENTICATION} {self.namespace}/{self.name}"


@dataclass
class Read:
    """The outcome of reading one object: the compiled object, or the errors that reject it."""

    ref: str
    policy: AuthorizationPolicy | PeerAuthentication | None = None
    errors: list[PolicyError] = field(default_factory=list)


def _show(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


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


def _port(value: Any) -> int | None:
    """A port from a numeric string (or, for map keys, an integer) in 1..65535, else None."""
    if isinstance(value, str) and value.isascii() and value.isdigit():
        number = int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        return None
    return number if 1 <= number <= 65535 else None


class _Reader:
    """Walks one object's spec, collecting errors against field paths."""

    def __init__(self, ref: str) -> None:
        self.ref = ref
        self.errors: list[PolicyError] = []
        self.notes: list[Note] = []

    def error(self, path: str, message: str) -> None:
        self.errors.append(PolicyError(self.ref, path, message))

    def mapping(self, value: Any, path: str, fields: Collection[str] | None,
                string_keys: bool = True) -> Mapping[str, Any] | None:
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
                self.error(f"{path}.{key}", f"unknown field (known here: {', '.join(fields)})")
        return value

    def required(self, value: Any, path: str, fields: Collection[str]) -> Mapping[str, Any] | None:
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

    def strings(self, value: Any, path: str) -> list[str]:
        """A list of non-empty strings (absent: empty); wrong entries are reported and left out."""
        out: list[str] = []
        for i, item in enumerate(self.items(value, path) or ()):
            if not isinstance(item, str):
                hint = f' (quote it: "{item}")' if isinstance(item, int | float) and not isinstance(item, bool) else ""
                self.error(f"{path}[{i}]", f"must be a string, not {_type(item)}{hint}")
            elif not item:
                self.error(f"{path}[{i}]", "must not be empty")
            else:
                out.append(item)
        return out

    def text(self, value: Any, path: str) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str):
            self.error(path, f"must be a string, not {_type(value)}")
            return None
        return value

    # -- typed lists ------------------------------------------------------------------------------------

    def patterns(self, value: Any, path: str, principals: bool = False) -> StringSet:
        values = self.strings(value, path)
        for i, v in enumerate(values):
            if "*" in v[1:-1] or v == "**":
                self.notes.append((logging.WARNING, f"{self.ref}: {path}[{i}] {_show(v)}: '*' only works as the "
                                   "whole value, a prefix (x*) or a suffix (*x); elsewhere it is matched literally"))
            if principals and v.startswith("spiffe://"):
                self.notes.append((logging.WARNING, f"{self.ref}: {path}[{i}] {_show(v)}: principals are written "
                                   "without spiffe:// (cluster.local/ns/NS/sa/SA); this one never matches"))
        return StringSet.of(values)

    def blocks(self, value: Any, path: str) -> IpSet:
        networks = []
        for i, v in enumerate(self.strings(value, path)):
            try:
                networks.append(matchers.parse_block(v))
            except ValueError:
                what = "a CIDR" if "/" in v else "an IP address or CIDR"
                self.error(f"{path}[{i}]", f"{_show(v)} is not {what}")
        return IpSet.of(networks)

    def ports(self, value: Any, path: str) -> frozenset[int]:
        out = set()
        for i, v in enumerate(self.strings(value, path)):
            port = _port(v)
            if port is None:
                self.error(f"{path}[{i}]", f"{_show(v)} is not a port (a number in 1..65535, as a string)")
            else:
                out.add(port)
        return frozenset(out)

    def accounts(self, value: Any, path: str, namespace: str) -> frozenset[str]:
        """``ns/sa`` (or ``sa``, in the policy's namespace) as ``/ns/NS/sa/SA``, the tail of a principal."""
        out = set()
        for i, v in enumerate(self.strings(value, path)):
            ns, slash, sa = v.partition("/")
            if not slash:
                ns, sa = namespace, v
            if not ns or not sa or "/" in sa or "*" in v:
                self.error(f"{path}[{i}]", f"{_show(v)} is not a service account (namespace/name, no wildcards)")
            else:
                out.add(f"/ns/{ns}/sa/{sa}")
        return frozenset(out)

    def selector(self, value: Any, path: str) -> frozenset[tuple[str, str]] | None:
        """``matchLabels`` as a set of items; None for no selector or one with no labels."""
        selector = self.mapping(value, path, _SELECTOR)
        if selector is None:
            return None
        labels = self.mapping(selector.get("matchLabels"), f"{path}.matchLabels", None)
        if not labels:
            return None
        out = set()
        for k, v in labels.items():
            where = f"{path}.matchLabels.{k}"
            if not isinstance(v, str):
                self.error(where, f"label values must be strings, not {_type(v)}")
            elif k == "" or "*" in str(k) or "*" in v:
                self.error(where, "empty keys and wildcards are not supported in selectors")
            else:
                out.add((str(k), v))
        return frozenset(out)

    def target_refs(self, spec: Mapping[str, Any]) -> bool:
        """Validate targetRef/targetRefs; whether there is any."""
        refs: list[tuple[str, Any]] = []
        if spec.get("targetRef") is not None:
            refs.append(("spec.targetRef", spec["targetRef"]))
        for i, ref in enumerate(self.items(spec.get("targetRefs"), "spec.targetRefs") or ()):
            refs.append((f"spec.targetRefs[{i}]", ref))
        for path, ref in refs:
            m = self.required(ref, path, _TARGET_REF)
            if m is None:
                continue
            for key in _TARGET_REF:
                self.text(m.get(key), f"{path}.{key}")
            for key in ("kind", "name"):
                if not m.get(key):
                    self.error(f"{path}.{key}", "must be set")
            if m.get("namespace"):
                self.error(f"{path}.namespace", "must not be set: cross-namespace references are not supported")
        return bool(refs)


# -- metadata -------------------------------------------------------------------------------------------


def _metadata(obj: Mapping[str, Any], kind: str) -> tuple[str, str, float, list[PolicyError]]:
    """(namespace, name, creationTimestamp, errors) of an object."""
    meta = obj.get("metadata")
    errors: list[PolicyError] = []
    if not isinstance(meta, Mapping):
        meta = {}
    name, namespace = meta.get("name"), meta.get("namespace") or "default"
    shown = f"{kind} {namespace if isinstance(namespace, str) else '?'}/{name if isinstance(name, str) else '?'}"
    if not isinstance(name, str) or not name:
        errors.append(PolicyError(shown, "metadata.name", "must be a non-empty string"))
    if not isinstance(namespace, str):
        errors.append(PolicyError(shown, "metadata.namespace", "must be a string"))
    return (namespace if isinstance(namespace, str) else "?", name if isinstance(name, str) else "?",
            _created(meta.get("creationTimestamp")), errors)


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


def _spec(reader: _Reader, obj: Mapping[str, Any], fields: Collection[str]) -> Mapping[str, Any]:
    spec = reader.mapping(obj.get("spec"), "spec", fields)
    return spec if spec is not None else {}


# -- AuthorizationPolicy --------------------------------------------------------------------------------


def _given(m: Mapping[str, Any], key: str) -> Any:
    """``m[key]`` unless it is absent, null or an empty list (which Istio reads as unset)."""
    value = m.get(key)
    return None if value is None or (isinstance(value, list) and not value) else value


_ReadEntry = Callable[[Any, str], tuple[Alternative, list[str]]]


class _PolicyReader(_Reader):
    def __init__(self, ref: str, namespace: str) -> None:
        super().__init__(ref)
        self.namespace = namespace

    def source(self, value: Any, path: str) -> tuple[Alternative, list[str]]:
        """A ``from[].source`` as one alternative (its L4 fields, ANDed), and the HTTP fields it uses."""
        src = self.required(value, path, _SOURCE_L4 + _SOURCE_L7)
        if src is None:
            return (), []
        if all(_given(src, k) is None for k in _SOURCE_L4 + _SOURCE_L7):
            self.error(path, "must not be empty")
        if (any(_given(src, k) is not None for k in ("serviceAccounts", "notServiceAccounts"))
                and any(_given(src, k) is not None for k in ("principals", "notPrincipals", "namespaces",
                                                               "notNamespaces"))):
            self.error(path, "serviceAccounts cannot be set with namespaces or principals")
        tests: list[Check] = []
        for key, negate in (("principals", False), ("notPrincipals", True)):
            if (raw := _given(src, key)) is not None:
                tests.append(Check("principal", self.patterns(raw, f"{path}.{key}", principals=True), negate))
        for key, negate in (("namespaces", False), ("notNamespaces", True)):
            if (raw := _given(src, key)) is not None:
                tests.append(Check("namespace", self.patterns(raw, f"{path}.{key}"), negate))
        for key, negate in (("serviceAccounts", False), ("notServiceAccounts", True)):
            if (raw := _given(src, key)) is not None:
                tests.append(Check("service_account", self.accounts(raw, f"{path}.{key}", self.namespace), negate))
        for key, negate in (("ipBlocks", False), ("notIpBlocks", True)):
            if (raw := _given(src, key)) is not None:
                tests.append(Check("source_ip", self.blocks(raw, f"{path}.{key}"), negate))
        http = []
        for key in _SOURCE_L7:
            if (raw := _given(src, key)) is not None:
                if key.endswith("IpBlocks"):
                    self.blocks(raw, f"{path}.{key}")
                else:
                    self.patterns(raw, f"{path}.{key}")
                http.append(key)
        return tuple(tests), http

    def operation(self, value: Any, path: str) -> tuple[Alternative, list[str]]:
        """A ``to[].operation`` as one alternative (its ports), and the HTTP fields it uses."""
        op = self.required(value, path, _OPERATION_L4 + _OPERATION_L7)
        if op is None:
            return (), []
        if all(_given(op, k) is None for k in _OPERATION_L4 + _OPERATION_L7):
            self.error(path, "must not be empty")
        tests: list[Check] = []
        for key, negate in (("ports", False), ("notPorts", True)):
            if (raw := _given(op, key)) is not None:
                tests.append(Check("port", self.ports(raw, f"{path}.{key}"), negate))
        http = []
        for key in _OPERATION_L7:
            if (raw := _given(op, key)) is not None:
                self.strings(raw, f"{path}.{key}")
                http.append(key)
        return tuple(tests), http

    def condition(self, value: Any, path: str) -> tuple[Alternative, list[str]]:
        """A ``when[]`` condition as one alternative (values AND not notValues), and its key if HTTP-only."""
        cond = self.required(value, path, _CONDITION)
        if cond is None:
            return (), []
        key = self.text(cond.get("key"), f"{path}.key")
        if not key:
            if key is not None or "key" not in cond:
                self.error(f"{path}.key", "must be set")
            return (), []
        if _given(cond, "values") is None and _given(cond, "notValues") is None:
            self.error(path, f"at least one of values or notValues must be set for key {key}")
        tests: list[Check] = []
        for part, negate in (("values", False), ("notValues", True)):
            raw, where = _given(cond, part), f"{path}.{part}"
            if raw is None:
                continue
            if key in ("source.ip", "destination.ip", "remote.ip"):
                blocks = self.blocks(raw, where)
                if key != "remote.ip":
                    tests.append(Check("source_ip" if key == "source.ip" else "destination_ip", blocks, negate))
            elif key == "destination.port":
                tests.append(Check("port", self.ports(raw, where), negate))
            elif key == "source.namespace":
                tests.append(Check("namespace", self.patterns(raw, where), negate))
            elif key == "source.principal":
                tests.append(Check("principal", self.patterns(raw, where, principals=True), negate))
            else:
                self.strings(raw, where)
        if key in _WHEN_L4:
            return tuple(tests), []
        if key in _WHEN_L7:
            return (), [key]
        if key.startswith(_WHEN_L7_MAPS):
            opening = key.find("[")
            if not (key.endswith("]") and 0 < opening < len(key) - 2):
                self.error(f"{path}.key", f"{_show(key)} should have the form name[item]")
            return (), [key]
        if key.startswith("destination.labels"):
            self.error(f"{path}.key", f"{_show(key)} is replaced by the workload selector")
        elif key in _WHEN_REPLACED:
            self.error(f"{path}.key", f"{_show(key)} {_WHEN_REPLACED[key]}")
        else:
            self.error(f"{path}.key", f"unknown attribute {_show(key)}")
        return (), []

    def clause(self, value: Any, path: str, entry: str, read: _ReadEntry) -> tuple[Clause | None, list[str]]:
        """A ``from`` or ``to`` list as one clause (any entry matches), and the HTTP fields used; None if it
        places no condition (absent, or an entry left with no L4 field)."""
        entries = self.items(value, path)
        if entries is None:
            return None, []
        if not entries:
            self.error(path, "must not be empty (leave it out to place no condition)")
            return None, []
        alternatives: list[Alternative] = []
        http: list[str] = []
        for i, item in enumerate(entries):
            m = self.required(item, f"{path}[{i}]", (entry,))
            if m is None:
                continue
            alternative, found = read(m.get(entry), f"{path}[{i}].{entry}")
            alternatives.append(alternative)
            http += found
        return matchers.clause(alternatives), http

    def rule(self, value: Any, index: int, action: str, ref: str) -> tuple[Rule | None, list[str]]:
        """One rule and the HTTP attributes it uses; no rule if it never matches at L4 (an ALLOW rule with
        HTTP attributes) or is invalid."""
        path = f"spec.rules[{index}]"
        if value is None:
            self.error(path, "must not be null (a rule matching everything is {})")
            return None, []
        rule = self.mapping(value, path, _RULE)
        if rule is None:
            return None, []
        clauses: list[Clause] = []
        http: list[str] = []
        for key, entry, read in (("from", "source", self.source), ("to", "operation", self.operation)):
            found_clause, found = self.clause(rule.get(key), f"{path}.{key}", entry, read)
            if found_clause is not None:
                clauses.append(found_clause)
            http += found
        for i, cond in enumerate(self.items(rule.get("when"), f"{path}.when") or ()):
            alternative, found = self.condition(cond, f"{path}.when[{i}]")
            if alternative:
                clauses.append((alternative,))
            http += found
        if http and action == ALLOW:
            return None, http
        verb = "allowed" if action == ALLOW else "denied"
        decision = Decision(action == ALLOW, ref, index, f"{verb} by {ref} rule {index}")
        return Rule(index, tuple(clauses), decision), http


def read_authorization_policy(obj: Mapping[str, Any]) -> Read:
    """Validate and compile one AuthorizationPolicy object."""
    namespace, name, _created, errors = _metadata(obj, AUTHORIZATION_POLICY)
    ref = f"{AUTHORIZATION_POLICY} {namespace}/{name}"
    reader = _PolicyReader(ref, namespace)
    reader.errors += errors
    spec = _spec(reader, obj, _AP_SPEC)

    action = spec.get("action")
    if action is None or action == "":
        action = ALLOW
    elif action in ("AUDIT", "CUSTOM"):
        reader.error("spec.action", f"{action} is not supported at L4: only ALLOW and DENY are enforced here "
                                    f"(ztunnel rejects {action}; use a waypoint)")
    elif action not in (ALLOW, DENY):
        reader.error("spec.action", f"unknown action {_show(action)} (expected ALLOW or DENY)")
    if spec.get("provider") is not None and action != "CUSTOM":
        reader.error("spec.provider", "is only valid with action CUSTOM")

    selector = reader.selector(spec.get("selector"), "spec.selector")
    targeted = reader.target_refs(spec)
    if targeted and spec.get("selector") is not None:
        reader.error("spec", "only one of selector or targetRefs can be set")

    raw_rules = reader.items(spec.get("rules"), "spec.rules")
    if action == DENY and not raw_rules:
        reader.error("spec.rules", "a DENY policy without rules never applies; add an empty rule {} to deny "
                                   "everything in its scope")
    rules: list[Rule] = []
    http_by_rule: dict[int, list[str]] = {}
    for i, raw in enumerate(raw_rules or ()):
        rule, http = reader.rule(raw, i, str(action), ref)
        if rule is not None:
            rules.append(rule)
        if http:
            http_by_rule[i] = sorted(set(http))

    if http_by_rule:
        found = sorted({a for attrs in http_by_rule.values() for a in attrs})
        where = ", ".join(str(i) for i in http_by_rule)
        consequence = ("ALLOW rules using them never match here" if action == ALLOW else
                       "DENY rules are enforced without them, which denies more than requested")
        reader.notes.append((logging.WARNING, f"{ref}: uses HTTP attributes that L4 cannot see ({', '.join(found)}) "
                             f"in rule(s) {where}: {consequence}; use a waypoint to enforce HTTP rules"))
    if targeted:
        reader.notes.append((logging.INFO, f"{ref}: has targetRefs, so it is for waypoints and is not enforced at L4"))

    if reader.errors:
        return Read(ref, errors=reader.errors)
    policy = AuthorizationPolicy(namespace, name, str(action), selector, tuple(rules), targeted, tuple(reader.notes))
    return Read(ref, policy)


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


def read_peer_authentication(obj: Mapping[str, Any]) -> Read:
    """Validate and compile one PeerAuthentication object."""
    namespace, name, created, errors = _metadata(obj, PEER_AUTHENTICATION)
    ref = f"{PEER_AUTHENTICATION} {namespace}/{name}"
    reader = _Reader(ref)
    reader.errors += errors
    spec = _spec(reader, obj, _PA_SPEC)
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
            path = f"spec.portLevelMtls.{key}"
            port = _port(key)
            if port is None:
                reader.error(path, f"{_show(key)} is not a port (1..65535)")
                continue
            ports[port] = _mode(reader, value, path)
    if DISABLE in (mode, *ports.values()):
        reader.notes.append((logging.INFO, f"{ref}: mode DISABLE is treated as PERMISSIVE in ambient mode"))
    if reader.errors:
        return Read(ref, errors=reader.errors)
    return Read(ref, PeerAuthentication(namespace, name, selector, mode, ports, (created, name), tuple(reader.notes)))


def read(obj: Mapping[str, Any]) -> Read | None:
    """Read an AuthorizationPolicy or PeerAuthentication; None for any other kind of object."""
    kind = obj.get("kind")
    if kind not in KINDS:
        return None
    api = obj.get("apiVersion")
    if api is not None:
        if not isinstance(api, str):
            return Read(f"{kind} ?", errors=[PolicyError(f"{kind} ?", "apiVersion", "must be a string")])
        group, _, version = api.rpartition("/")
        if group != GROUP:
            return None  # another API group's kind of the same name
        if version not in VERSIONS:
            result = read_authorization_policy(obj) if kind == AUTHORIZATION_POLICY else read_peer_authentication(obj)
            error = PolicyError(result.ref, "apiVersion",
                                f"unsupported version {_show(version)} (expected {' or '.join(VERSIONS)})")
            return Read(result.ref, errors=[error, *result.errors])
    return read_authorization_policy(obj) if kind == AUTHORIZATION_POLICY else read_peer_authentication(obj)
