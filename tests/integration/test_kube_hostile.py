"""An informer against an API server that sends bad HTTP (a scripted server on loopback): every bad answer is
logged naming the request and what was wrong, the informer backs off, watches again from the version it had, relists
on a 410, and ends with the right cache; nothing is logged as a crash."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.kube import PODS, Informer, connect
from agent.kube.informer import MAX_EVENT_LINE
from agent.retry import Backoff
from tests.fixtures.eventually import eventually
from tests.fixtures.hostile_http import HostileServer, SeenRequest, chunked, reply
from tests.fixtures.kube_fake import pod

BACKOFF = Backoff(initial=0.05, cap=1.0, jitter=0.25)


def listed(version: str, *names: str) -> bytes:
    items = [{**pod(n), "metadata": {**pod(n)["metadata"], "resourceVersion": version}} for n in names]
    return reply("200 OK", json.dumps({"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": version},
                                       "items": items}).encode(), "Content-Type: application/json")


def event(kind: str, obj: dict[str, Any]) -> bytes:
    return json.dumps({"type": kind, "object": obj}).encode() + b"\n"


def versioned(name: str, version: str) -> dict[str, Any]:
    obj = pod(name)
    return {**obj, "metadata": {**obj["metadata"], "resourceVersion": version}}


GONE = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 410, "reason": "Expired",
        "message": "too old resource version: 6 (9)"}

LISTS = [
    b"HTTP/1.1 2OO OK\r\nContent-Length: 0\r\n\r\n",  # bad status line
    b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"kind\"",  # truncated body
    listed("5", "a"),
    listed("10", "a", "c"),
]
WATCHES = [
    # one good event, then a chunk size that is not hex
    chunked("200 OK", event("ADDED", versioned("b", "6")), end=False) + b"zz\r\n{}\r\n0\r\n\r\n",
    chunked("200 OK", b"{" + b" " * MAX_EVENT_LINE + b"}\n"),  # a line over the bound
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Big: " + b"h" * 70_000 + b"\r\n\r\n",  # huge headers
    chunked("200 OK", event("ERROR", GONE)),  # 410 as an event: relist
]


async def test_an_informer_recovers_from_bad_answers(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lists, watches = iter(LISTS), iter(WATCHES)

    async def answer(request: SeenRequest, writer: asyncio.StreamWriter) -> bool:
        if "watch=true" not in request.target:
            writer.write(next(lists))
            return False
        data = next(watches, None)
        if data is None:  # the last watch stays open with nothing to say
            writer.write(chunked("200 OK", end=False))
            await writer.drain()
            await asyncio.sleep(30)
        else:
            writer.write(data)
        return False

    async with HostileServer(answer) as server:
        config = tmp_path / "config"
        config.write_text(yaml.safe_dump({
            "current-context": "c", "clusters": [{"name": "c", "cluster": {"server": server.url}}],
            "users": [{"name": "u", "user": {"token": "t"}}],
            "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}))
        connection = await connect(config)
        informer = Informer(connection.api, PODS, backoff=BACKOFF, resync=None)
        task = asyncio.create_task(informer.run())
        try:
            with caplog.at_level(logging.INFO, "agent.kube.informer"):
                await eventually(lambda: len([r for r in server.requests if "watch=true" in r.target]) == 5,
                                 "the fifth watch", within=10)
                await eventually(lambda: set(informer.cache) == {"default/a", "default/c"}, "the relisted cache")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await connection.close()
        url = f"GET {server.url}/api/v1/pods?"
    assert (informer.lists, informer.relists_gone) == (2, 1)
    assert informer.resource_version == "10"
    watched_from = [r.target.split("resourceVersion=")[1].split("&")[0] for r in server.requests
                    if "watch=true" in r.target]
    assert watched_from == ["5", "6", "6", "6", "10"]  # each failed watch resumed from the last version seen
    logged = caplog.text
    for message in ("malformed answer: illegal status line: bytearray(b'HTTP/1.1 2OO OK')",
                    "malformed answer: peer closed connection without sending complete message body (received 7 bytes, "
                    "expected 100), after 7 bytes of the body",
                    "malformed answer: illegal chunk header: bytearray(b'zz\\r\\n'), after ",
                    f"a line longer than {MAX_EVENT_LINE} bytes starts at byte 0 of the body",
                    "malformed answer: a header block (status line, headers or chunk size line) longer than"):
        assert message in logged, message
        assert any(message in r.getMessage() and url in r.getMessage() for r in caplog.records), message
    assert "resourceVersion 6 is too old (too old resource version: 6 (9)), relisting" in logged
    assert not [r for r in caplog.records if r.exc_info], "a bad answer was logged as a crash"
    # Back-off after each failure, growing while failures follow each other: the list failed twice in a row, the
    # watches after the one that delivered "b" three times (the 410 relists at once).
    times = [r.at for r in server.requests]
    kinds = ["watch" if "watch=true" in r.target else "list" for r in server.requests]
    assert kinds == ["list", "list", "list", "watch", "watch", "watch", "watch", "list", "watch"]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    for gap, failures in ((gaps[0], 1), (gaps[1], 2), (gaps[3], 1), (gaps[4], 2), (gaps[5], 3)):
        assert gap >= 0.95 * BACKOFF.delay(failures, 1.0), (failures, gaps)
    assert gaps[6] < BACKOFF.delay(1, 1.0), gaps  # a 410 after a working watch relists at once
