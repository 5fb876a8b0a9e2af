"""The admin HTTP servers with a real HTTP client (urllib, in a thread): /metrics, /healthz/ready,
/config_dump (no private keys), /logging."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import re
import socket
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.telemetry.admin import REDACTED, AdminServer, scrub
from agent.telemetry.metrics import Metrics
from agent.telemetry.model import Endpoint
from agent.telemetry.recorder import FlowRecorder

KEY_PEM = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n-----END PRIVATE KEY-----\n"
LOCAL = ("127.0.0.1", 0)


class State:
    def __init__(self) -> None:
        self.ready: tuple[bool, str] = (False, "certificates for 2 workloads not fetched yet")


@pytest.fixture
async def admin() -> AsyncIterator[tuple[AdminServer, State]]:
    metrics = Metrics()
    rec = FlowRecorder("node-1", metrics=metrics)
    rec.start(direction="EGRESS", reporter="source", source=Endpoint("10.0.0.1", 1),
              destination=Endpoint("10.0.0.2", 2), mtls=False).end(10, 20, "eof")
    state = State()

    async def dump() -> dict[str, Any]:
        return {"workloads": [{"name": "web-0", "ip": "10.0.0.2"}],
                "certificates": [{"identity": "spiffe://cluster.local/ns/a/sa/b", "chain_pem": "CERT",
                                  "key_pem": KEY_PEM, "private_key": "x"}],
                "attachments": [{"ifname": "veth1", "backend": "tcx"}], "leak": KEY_PEM.encode()}

    server = AdminServer(metrics, ready=lambda: state.ready, config_dump=dump)
    await server.start(metrics=LOCAL, ready=LOCAL, admin=LOCAL)
    yield server, state
    await server.close()


def fetch(url: str, *, method: str = "GET", headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


async def http(url: str, **kw: Any) -> tuple[int, dict[str, str], bytes]:
    return await asyncio.to_thread(fetch, url, **kw)


async def test_metrics_endpoint(admin: tuple[AdminServer, State]) -> None:
    server, _ = admin
    url = f"http://127.0.0.1:{server.ports['metrics']}/metrics"
    status, headers, body = await http(url)
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=")
    assert int(headers["Content-Length"]) == len(body)
    names = {f.name for f in text_string_to_metric_families(body.decode())}
    assert {"istio_tcp_connections_opened", "hubble_flows_processed", "ambit_workloads"} <= names
    status, headers, body = await http(url, headers={"Accept-Encoding": "gzip"})
    assert status == 200 and headers.get("Content-Encoding") == "gzip"
    assert b"istio_tcp_connections_closed_total" in gzip.decompress(body)
    status, headers, body = await http(url, headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert headers["Content-Type"].startswith("application/openmetrics-text") and body.endswith(b"# EOF\n")
    assert (await http(url, method="HEAD"))[0] == 200
    assert (await http(f"http://127.0.0.1:{server.ports['metrics']}/config_dump"))[0] == 404  # not on 15020


async def test_readiness(admin: tuple[AdminServer, State]) -> None:
    server, state = admin
    url = f"http://127.0.0.1:{server.ports['ready']}/healthz/ready"
    status, _, body = await http(url)
    assert status == 503 and body == b"not ready: certificates for 2 workloads not fetched yet\n"
    state.ready = (True, "")
    status, _, body = await http(url)
    assert status == 200 and body == b"ready\n"


async def test_readiness_check_that_raises_is_not_ready() -> None:
    def broken() -> tuple[bool, str]:
        raise RuntimeError("store not loaded")

    server = AdminServer(Metrics(), ready=broken)
    await server.start(metrics=None, ready=LOCAL, admin=None)
    try:
        status, _, body = await http(f"http://127.0.0.1:{server.ports['ready']}/healthz/ready")
        assert status == 503 and b"store not loaded" in body
    finally:
        await server.close()


async def test_config_dump_has_no_private_keys(admin: tuple[AdminServer, State]) -> None:
    server, _ = admin
    status, headers, body = await http(f"http://127.0.0.1:{server.ports['admin']}/config_dump")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert b"PRIVATE KEY" not in body
    dump = json.loads(body)
    cert = dump["certificates"][0]
    assert cert["chain_pem"] == "CERT" and cert["key_pem"] == REDACTED and cert["private_key"] == REDACTED
    assert dump["leak"] == REDACTED and dump["workloads"][0]["name"] == "web-0"
    assert dump["attachments"] == [{"backend": "tcx", "ifname": "veth1"}]


async def test_logging(admin: tuple[AdminServer, State]) -> None:
    server, _ = admin
    url = f"http://127.0.0.1:{server.ports['admin']}/logging"
    before = logging.getLogger("agent.proxy").level
    try:
        status, _, body = await http(url)
        assert status == 200 and set(json.loads(body)) == {"root", "agent", "hbone"}
        status, _, body = await http(f"{url}?agent.proxy=debug", method="POST")
        assert status == 200 and logging.getLogger("agent.proxy").level == logging.DEBUG
        assert (await http(f"{url}?level=loud", method="POST"))[0] == 400
        assert (await http(url, method="POST"))[0] == 400
    finally:
        logging.getLogger("agent.proxy").setLevel(before)


async def test_port_in_use_is_an_error_unless_the_next_agent_shares_it() -> None:
    """The next agent's listeners share the ports during an upgrade (SO_REUSEPORT); a port another program
    holds is an error."""
    first = AdminServer(Metrics(), ready=lambda: (True, ""))
    await first.start(metrics=LOCAL, ready=None, admin=None)
    second = AdminServer(Metrics(), ready=lambda: (True, ""))
    third = AdminServer(Metrics(), ready=lambda: (True, ""))
    try:
        await second.start(metrics=("127.0.0.1", first.ports["metrics"]), ready=None, admin=None)
        assert second.ports["metrics"] == first.ports["metrics"]
        with socket.create_server(("127.0.0.1", 0)) as stranger, pytest.raises(OSError):
            await third.start(metrics=("127.0.0.1", stranger.getsockname()[1]), ready=None, admin=None)
    finally:
        for server in (first, second, third):
            await server.close()


def test_scrub() -> None:
    assert scrub({"a": [{"token": "t", "ok": ("x", b"y")}], "secret_thing": 1, "n": 2}) == \
        {"a": [{"token": REDACTED, "ok": ["x", "y"]}], "secret_thing": REDACTED, "n": 2}


async def exchange(port: int, data: bytes) -> bytes:
    """Send ``data`` on a new connection; everything the server answers until it closes (within 5 s)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(5):
            return await reader.read(-1)
    finally:
        writer.close()


MALFORMED = {
    "not HTTP": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400, b"bad request: "),
    "bad request line": (b"GET /metrics HTTP/9\r\n\r\n", 400, b"bad request: illegal request line"),
    "bad header": (b"GET /metrics HTTP/1.1\r\nHost: a\r\nno colon\r\n\r\n", 400, b"bad request: illegal header line"),
    "no Host": (b"GET /metrics HTTP/1.1\r\n\r\n", 400, b"bad request: Missing mandatory Host: header"),
    "bad Content-Length": (b"POST /logging HTTP/1.1\r\nHost: a\r\nContent-Length: ten\r\n\r\n", 400,
                           b"bad request: bad Content-Length"),
    "oversized headers": (b"GET /metrics HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n", 400,
                          b"bad request: request line and headers longer than 16384 bytes"),
    "oversized headers, in pieces": (b"GET /metrics HTTP/1.1\r\nHost: a\r\n" + b"X-Big: a\r\n" * 2000, 400,
                                     b"bad request: request line and headers longer than 16384 bytes"),
    "oversized body": (b"POST /logging?level=info HTTP/1.1\r\nHost: a\r\nContent-Length: 70000\r\n\r\n"
                       + b"x" * 70_000, 413, b"bad request: request body longer than 65536 bytes"),
}


@pytest.mark.parametrize("case", MALFORMED)
async def test_a_malformed_request_gets_400_and_everyone_else_is_served(admin: tuple[AdminServer, State],
                                                                        case: str) -> None:
    server, _ = admin
    port = server.ports["admin"] if b"/logging" in MALFORMED[case][0] else server.ports["metrics"]
    data, status, body = MALFORMED[case]
    # A client that has sent half a request holds its connection meanwhile: it must not hold up anyone else.
    _, idle_writer = await asyncio.open_connection("127.0.0.1", server.ports["metrics"])
    idle_writer.write(b"GET /metr")
    try:
        answer = await exchange(port, data)
        head, _, text = answer.partition(b"\r\n\r\n")
        assert head.startswith(f"HTTP/1.1 {status} ".encode()), answer[:200]
        assert b"connection: close" in head.lower() and text.startswith(body), answer[:300]
        status_code, _, scraped = await http(f"http://127.0.0.1:{server.ports['metrics']}/metrics")
        assert status_code == 200 and b"istio_tcp_connections_opened_total" in scraped
    finally:
        idle_writer.close()


async def test_keep_alive_wrong_methods_and_unknown_paths(admin: tuple[AdminServer, State]) -> None:
    server, _ = admin
    port = server.ports["metrics"]
    answer = await exchange(port, b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n"
                                  b"HEAD /metrics HTTP/1.1\r\nHost: a\r\n\r\n"
                                  b"POST /metrics HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n"
                                  b"GET /nope HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)
    assert statuses == [b"200", b"200", b"405", b"404"], answer[-600:]
    assert b"Allow: GET, HEAD" in answer
