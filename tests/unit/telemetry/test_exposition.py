"""The agent's own exposition writes, for every family shape the agent has and every value and label text that can
reach it, exactly the bytes prometheus_client's writers wrote, and negotiates the same format and Content-Type from
the Accept headers scrapers send; the text parses back with prometheus_client's parser."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator

import pytest
from prometheus_client import exposition as pc_text
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.openmetrics import exposition as pc_openmetrics
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from agent.telemetry.exposition import Family, go_float, negotiate, openmetrics, text
from agent.telemetry.metrics import TRAFFIC_LABELS, Metrics
from agent.telemetry.model import Endpoint

AWKWARD = ["", "plain", 'quote"d', "back\\slash", "new\nline", "tab\tand space", "ünïcødé ✓", "a=b,c}", "{x}"]
VALUES = [0, 1, 1.5, -2, 3.0, 1e6, 1234567.0, 12345678.0, 1e16, 2.5e-7, -1e9, math.inf, -math.inf, 7 * 10**12,
          123456789012345678, 0.1 + 0.2]


class _Registry(Collector):
    """prometheus_client's view of the same families."""

    def __init__(self, families: list[Family]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        for f in self.families:
            cls = CounterMetricFamily if f.type == "counter" else GaugeMetricFamily
            fam = cls(f.name, f.doc, labels=f.labelnames)
            for labels, value in f.samples:
                fam.add_metric(labels, value)
            yield fam


def _families(seed: int) -> list[Family]:
    rnd = random.Random(seed)
    out = []
    for i in range(6):
        labelnames = tuple(rnd.sample(["zeta", "alpha", "mid", "b_2", "_under", "source_app"], rnd.randint(0, 4)))
        samples = [(tuple(rnd.choice(AWKWARD) for _ in labelnames), rnd.choice(VALUES))
                   for _ in range(rnd.randint(0, 5) if labelnames else 1)]
        doc = rnd.choice(["Plain help", 'Help with "quotes"', "Help with back\\slash", "Two\nlines", ""])
        out.append(Family(f"fam_{seed}_{i}", doc, rnd.choice(["counter", "gauge"]), labelnames, samples))
    return out


@pytest.mark.parametrize("seed", range(40))
def test_both_formats_are_byte_for_byte_prometheus_clients(seed: int) -> None:
    families = _families(seed)
    assert text(families) == pc_text.generate_latest(_Registry(families))
    assert openmetrics(families) == pc_openmetrics.generate_latest(_Registry(families))  # type: ignore[no-untyped-call]


def test_the_agents_own_families_are_byte_for_byte_prometheus_clients() -> None:
    metrics = Metrics(clock=lambda: 1000.0)
    src = Endpoint("10.1.0.7", 41000, "spiffe://cluster.local/ns/shop/sa/client", "shop", "client-5f7c-x2",
                   {"app": 'cli"ent', "version": "v\\2"}, workload="client")
    dst = Endpoint("10.1.0.8", 8080, "spiffe://cluster.local/ns/shop/sa/web", "shop", "web-0", {},
                   service="web.shop.svc.cluster.local")
    metrics.connection_opened("source", src, dst, True).close(300, 7000)
    metrics.connection_denied("destination", src, dst, True)
    metrics.flow_processed("L3_L4", "to-endpoint", "FORWARDED")
    metrics.tcp_flags(["SYN", "FIN"], "IPv4")
    metrics.lost_events("perf_event_ring_buffer", 3)
    metrics.set_workloads(3, 1)
    metrics.set_certificate_expiry("spiffe://cluster.local/ns/shop/sa/web", 87400.5)
    metrics.set_ebpf_attachments([("ambit_pod_ingress", "tcx"), ("ambit_pod_ingress", "tcx")])
    families = metrics.families()
    assert text(families) == pc_text.generate_latest(_Registry(families))
    assert openmetrics(families) == pc_openmetrics.generate_latest(_Registry(families))  # type: ignore[no-untyped-call]
    parsed = {f.name: f for f in text_string_to_metric_families(text(families).decode())}
    opened = parsed["istio_tcp_connections_opened"].samples
    assert {s.labels["source_app"] for s in opened} == {'cli"ent'} and set(opened[0].labels) == set(TRAFFIC_LABELS)
    assert parsed["ambit_certificate_expiry_seconds"].samples[0].value == 86400.5


@pytest.mark.parametrize("value", [*VALUES, math.nan, 5e-324, 1.7976931348623157e308, 999999.9, 9999999.0])
def test_values_are_written_as_go_writes_them(value: float) -> None:
    from prometheus_client.utils import floatToGoString

    assert go_float(value) == floatToGoString(value)  # type: ignore[no-untyped-call]


ACCEPTS = [
    "",
    "*/*",
    "text/plain",
    "text/plain;version=0.0.4",
    "text/plain; version=1.0.0",
    "text/plain;version=1.0.0;escaping=allow-utf-8",
    # Prometheus 2.x
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
    "text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    # Prometheus 3.x
    "application/openmetrics-text;version=1.0.0;escaping=underscores;q=0.5,"
    "application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=1.0.0;escaping=underscores;q=0.3,"
    "text/plain;version=0.0.4;q=0.2,*/*;q=0.1",
    "application/openmetrics-text",
    "application/openmetrics-text; version=0.0.1",
    "application/openmetrics-text; version=0.0.1, text/plain; version=0.0.4",
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8",
    "application/json, text/html",
]


@pytest.mark.parametrize("accept", ACCEPTS)
def test_the_format_and_content_type_are_negotiated_as_prometheus_client_did(accept: str) -> None:
    families = _families(7)
    encoder, content_type = negotiate(accept)
    theirs, their_type = pc_text.choose_encoder(accept)
    assert content_type == their_type
    assert encoder(families) == theirs(_Registry(families))


@pytest.mark.parametrize("kind", ["application/openmetrics-text", "text/plain"])
@pytest.mark.parametrize("scheme", ["dots", "values", "no-such-scheme"])
def test_an_escaping_scheme_that_would_rename_is_answered_with_underscores(kind: str, scheme: str) -> None:
    """Names never need escaping: the reply says "underscores", under which a client reads them as they are."""
    encoder, content_type = negotiate(f"{kind};version=1.0.0;escaping={scheme}")
    assert content_type.endswith("; escaping=underscores")
    families = _families(3)
    assert encoder(families) == (openmetrics if kind.startswith("application") else text)(families)


def test_a_version_that_is_not_numbers_is_passed_over() -> None:
    """prometheus_client raised on it (TypeError comparing versions): a scrape with a bad header fails nothing."""
    assert negotiate("application/openmetrics-text;version=one,text/plain") == (text, pc_text.CONTENT_TYPE_PLAIN_0_0_4)


@pytest.mark.parametrize("name, labels", [("has-dash", ()), ("9starts_with_digit", ()), ("ok", ("bad-label",)),
                                          ("ok", ("__reserved",)), ("", ())])
def test_names_outside_the_legacy_character_set_are_refused(name: str, labels: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="legacy character set"):
        Family(name, "doc", "gauge", labels, [])
