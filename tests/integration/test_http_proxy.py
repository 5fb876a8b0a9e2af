"""The Kubernetes client through an HTTP proxy on loopback, as HTTPS_PROXY / HTTP_PROXY / NO_PROXY say: TLS to
the API server inside a CONNECT tunnel (verified end to end), plain requests in absolute form, the proxy's
refusal named, and NO_PROXY honoured."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.http import ConnectError, Timeouts
from agent.kube import connect
from tests.fixtures.kube_fake import FakeApiServer

T = Timeouts(total=5)


class ConnectProxy:
    """A forward proxy: CONNECT host:port (tunnels bytes both ways) or a plain request in absolute form (one
    request per connection, relayed); ``refuse`` answers 403 to everything; ``seen``: each request line."""

    def __init__(self, *, refuse: bool = False) -> None:
        self.refuse = refuse
        self.seen: list[str] = []
        self.authorizations: list[str | None] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> ConnectProxy:
        self._server = await asyncio.start_server(self._accepted, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            line, *fields = head.split("\r\n")
            self.seen.append(line)
            headers = {k.lower(): v.strip() for k, _, v in (f.partition(":") for f in fields if f)}
            self.authorizations.append(headers.get("proxy-authorization"))
            if self.refuse:
                writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                return
            method, target, _ = line.split(" ")
            if method == "CONNECT":
                host, _, port = target.rpartition(":")
                up_reader, up_writer = await asyncio.open_connection(host, int(port))
                self._writers.append(up_writer)
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
                return
            authority, _, path = target.removeprefix("http://").partition("/")
            host, _, port = authority.rpartition(":")
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
            self._writers.append(up_writer)
            up_writer.write(f"{method} /{path} HTTP/1.1\r\n".encode() + "\r\n".join(
                f for f in fields if f and not f.lower().startswith(("proxy-", "connection"))).encode()
                            + b"\r\nConnection: close\r\n\r\n")
            await pipe(up_reader, writer)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()


@pytest.fixture
async def tls_api() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(tls=True, token="t") as server:
        yield server


async def status(kubeconfig: Path) -> int:
    connection = await connect(kubeconfig)
    try:
        return (await connection.api.call("GET", "/api/v1/pods", timeouts=T)).status
    finally:
        await connection.close()


async def test_https_through_a_connect_tunnel(tls_api: FakeApiServer, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    async with ConnectProxy() as proxy:
        monkeypatch.setenv("HTTPS_PROXY", f"http://user:pw@127.0.0.1:{proxy.port}")
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        assert await status(tls_api.write_kubeconfig(tmp_path / "config")) == 200
        port = tls_api.url.rsplit(":", 1)[1]
        assert proxy.seen == [f"CONNECT 127.0.0.1:{port} HTTP/1.1"]
        assert proxy.authorizations == ["Basic dXNlcjpwdw=="]
        assert [r.credential for r in tls_api.requests] == ["Bearer t"]  # TLS and the token went through
        monkeypatch.setenv("NO_PROXY", "localhost, 127.0.0.0/8")
        assert await status(tls_api.write_kubeconfig(tmp_path / "config")) == 200
        assert len(proxy.seen) == 1 and len(tls_api.requests) == 2  # direct this time


async def test_plain_http_through_a_proxy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with FakeApiServer(token="t") as api, ConnectProxy() as proxy:
        monkeypatch.setenv("HTTP_PROXY", f"127.0.0.1:{proxy.port}")
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        assert await status(api.write_kubeconfig(tmp_path / "config")) == 200
        assert proxy.seen == [f"GET {api.url}/api/v1/pods HTTP/1.1"]


async def test_a_proxy_that_refuses_is_named(tls_api: FakeApiServer, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    async with ConnectProxy(refuse=True) as proxy:
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.port}")
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        with pytest.raises(ConnectError, match=rf"^GET {tls_api.url}/api/v1/pods: proxy 127\.0\.0\.1:{proxy.port} "
                                               r"\(\$HTTPS_PROXY\) answered 403 Forbidden to CONNECT 127\.0\.0\.1:"):
            await status(tls_api.write_kubeconfig(tmp_path / "config"))
    monkeypatch.setenv("HTTPS_PROXY", "socks5://127.0.0.1:1080")
    with pytest.raises(ConnectError, match=r"/api/v1/pods: \$HTTPS_PROXY='socks5://127\.0\.0\.1:1080': only http://"):
        await status(tls_api.write_kubeconfig(tmp_path / "config"))
