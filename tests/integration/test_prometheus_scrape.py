"""A real Prometheus (the ``prometheus`` binary, Debian's package) scrapes the agent's metrics endpoint on loopback:
the target is up with no scrape error, and a query returns the values the agent counted. Prometheus asks for
OpenMetrics and gzip, so this is the content negotiation of a real scraper, not of our own client."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.telemetry.admin import AdminServer
from agent.telemetry.metrics import Metrics
from agent.telemetry.model import Endpoint
from agent.telemetry.recorder import FlowRecorder
from tests.fixtures.eventually import eventually

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="needs the prometheus binary (apt-get install prometheus)")


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return int(s.getsockname()[1])


def api(port: int, path: str, **query: str) -> Any:
    url = f"http://127.0.0.1:{port}/api/v1/{path}?{urllib.parse.urlencode(query)}"
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())["data"]


@pytest.fixture
async def agent_metrics() -> AsyncIterator[int]:
    metrics = Metrics()
    recorder = FlowRecorder("node-1", metrics=metrics)
    for _ in range(3):
        recorder.start(direction="EGRESS", reporter="source", source=Endpoint("10.0.0.1", 1),
                       destination=Endpoint("10.0.0.2", 2), mtls=False).end(10, 20, "eof")
    server = AdminServer(metrics, ready=lambda: (True, ""))
    await server.start(metrics=("127.0.0.1", 0), ready=None, admin=None)
    yield server.ports["metrics"]
    await server.close()


async def test_prometheus_scrapes_the_agent(agent_metrics: int, tmp_path: Path) -> None:
    assert PROMETHEUS is not None
    web = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(f"global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n"
                      f"  - job_name: ambit\n    static_configs:\n      - targets: ['127.0.0.1:{agent_metrics}']\n")
    log = (tmp_path / "prometheus.log").open("w")
    process = await asyncio.create_subprocess_exec(
        PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{web}", stdout=log, stderr=subprocess.STDOUT)
    try:
        def target() -> dict[str, Any] | None:
            try:
                targets = api(web, "targets")["activeTargets"]
            except OSError:
                return None
            return targets[0] if targets and targets[0]["health"] == "up" else None

        await eventually(lambda: target() is not None, "a successful scrape", within=30, blocking=True)
        up = await asyncio.to_thread(target)
        assert up is not None and up["lastError"] == ""
        result = await asyncio.to_thread(api, web, "query", query="sum(istio_tcp_connections_opened_total)")
        assert float(result["result"][0]["value"][1]) == 3.0
        result = await asyncio.to_thread(api, web, "query", query="sum(istio_tcp_received_bytes_total)")
        assert float(result["result"][0]["value"][1]) > 0
        duration = await asyncio.to_thread(api, web, "query", query="scrape_duration_seconds")
        print(f"\nPrometheus scrape_duration_seconds: {float(duration['result'][0]['value'][1]) * 1000:.2f} ms")
    finally:
        process.terminate()
        async with asyncio.timeout(10):
            await process.wait()
        log.close()
