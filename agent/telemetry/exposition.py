"""Prometheus exposition of the agent's metric families: the text format 0.0.4 and OpenMetrics 1.0.0, chosen from
the scraper's Accept header as prometheus_client chose them, byte for byte what its writers produced for the same
families (tests/unit/telemetry/test_exposition.py compares them).

The agent has counters and gauges only, with names and label names in Prometheus' legacy character set, without
colons (checked when a family is made), so no name ever needs escaping. Its own writer instead of prometheus_client's:
that package cost the idle agent 2.4 MiB (43 modules: its HTTP server, push gateway and the stdlib modules they
import), for the few lines below.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

TEXT_0_0_4 = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_1_0_0 = "application/openmetrics-text; version=1.0.0; charset=utf-8"

_METRIC_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")  # no colons: those are for recording rules
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")

Labels = tuple[str, ...]
Encoder = Callable[[Iterable["Family"]], bytes]


@dataclass(frozen=True, slots=True)
class Family:
    """One metric family: a counter's ``name`` is without its ``_total`` suffix (as in OpenMetrics); each sample
    is (label values in ``labelnames``' order, value)."""

    name: str
    doc: str
    type: Literal["counter", "gauge"]
    labelnames: Labels
    samples: Sequence[tuple[Labels, float]]

    def __post_init__(self) -> None:
        if not _METRIC_NAME.fullmatch(self.name):
            raise ValueError(f"metric name {self.name!r} is outside Prometheus' legacy character set")
        if bad := [n for n in self.labelnames if not _LABEL_NAME.fullmatch(n) or n.startswith("__")]:
            raise ValueError(f"metric {self.name}: label names {bad} are outside Prometheus' legacy character set")


def go_float(value: float) -> str:
    """A sample value as Prometheus' Go code writes it (exponents from 1e7 on, where Python waits until 1e16)."""
    value = float(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    s = repr(value)
    dot = s.find(".")
    if value > 0 and dot > 6:
        mantissa = f"{s[0]}.{s[1:dot]}{s[dot + 1:]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return s


def _escape_help(doc: str) -> str:
    return doc.replace("\\", r"\\").replace("\n", r"\n")


def _escape_value(value: str) -> str:
    """A label value (or, in OpenMetrics, a HELP text) escaped."""
    return _escape_help(value).replace('"', r"\"")


def _samples(family: Family, name: str) -> Iterable[str]:
    """The family's sample lines, labels sorted by name."""
    order = sorted(range(len(family.labelnames)), key=family.labelnames.__getitem__)
    names = [family.labelnames[i] for i in order]
    for values, value in family.samples:
        labels = ",".join(f'{n}="{_escape_value(values[i])}"' for n, i in zip(names, order, strict=True))
        yield f"{name}{{{labels}}} {go_float(value)}\n" if labels else f"{name} {go_float(value)}\n"


def _sample_name(family: Family) -> str:
    return f"{family.name}_total" if family.type == "counter" else family.name


def text(families: Iterable[Family]) -> bytes:
    """The Prometheus text format 0.0.4 (a counter's HELP and TYPE name its ``_total`` series)."""
    out: list[str] = []
    for f in families:
        name = _sample_name(f)
        out.append(f"# HELP {name} {_escape_help(f.doc)}\n")
        out.append(f"# TYPE {name} {f.type}\n")
        out.extend(_samples(f, name))
    return "".join(out).encode()


def openmetrics(families: Iterable[Family]) -> bytes:
    """OpenMetrics 1.0.0 text, ``# EOF`` last."""
    out: list[str] = []
    for f in families:
        out.append(f"# HELP {f.name} {_escape_value(f.doc)}\n")
        out.append(f"# TYPE {f.name} {f.type}\n")
        out.extend(_samples(f, _sample_name(f)))
    out.append("# EOF\n")
    return "".join(out).encode()


def _version(params: Sequence[str]) -> str | None:
    """The version parameter of a media range, if any."""
    for p in params:
        key, sep, value = p.strip().partition("=")
        if sep and key == "version":
            return value
    return None


def _escaping(params: Sequence[str]) -> str:
    """The escaping scheme to name in the reply: the one asked for when it leaves legacy names as they are."""
    for p in params:
        key, sep, value = p.strip().partition("=")
        if sep and key == "escaping":
            return value if value in ("allow-utf-8", "underscores") else "underscores"
    return "underscores"


def _at_least_1(version: str) -> bool:
    """Is ``version`` 1.0.0 or later (a version that is not numbers and dots is not)?"""
    parts = version.split(".")
    return all(p.isdigit() for p in parts) and tuple(map(int, parts)) >= (1, 0, 0)


def negotiate(accept: str) -> tuple[Encoder, str]:
    """The writer and Content-Type for a scraper's Accept header, as prometheus_client negotiated them: the first
    OpenMetrics range without a version or with version >= 1.0.0 gets OpenMetrics (Prometheus asks for 1.0.0
    first); a text/plain range with version >= 1.0.0 gets the text format, so labelled; else the text format
    0.0.4. Quality values are not weighed (neither were they), a version that is not numbers (which made
    prometheus_client fail) is passed over. Names never need escaping here: a reply names the escaping scheme asked
    for when that scheme leaves legacy names as they are (``underscores``, ``allow-utf-8``), else ``underscores``
    (prometheus_client rewrote every name for ``dots`` and ``values``; under ``underscores`` a client reads them
    as they are)."""
    for media_range in accept.split(","):
        kind, *params = media_range.split(";")
        version = _version(params)
        if kind.strip() == "application/openmetrics-text":
            if version is None:
                return openmetrics, OPENMETRICS_1_0_0
            if _at_least_1(version):
                return openmetrics, (f"application/openmetrics-text; version={version}; charset=utf-8; "
                                     f"escaping={_escaping(params)}")
        elif kind.strip() == "text/plain" and version is not None and _at_least_1(version):
            return text, f"text/plain; version=1.0.0; charset=utf-8; escaping={_escaping(params)}"
    return text, TEXT_0_0_4
