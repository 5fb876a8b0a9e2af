"""The agent's small HTTP servers, on ztunnel's ports:

- 15020 ``/metrics``: Prometheus exposition of ``Metrics.families()`` (text format, or OpenMetrics when the
  scraper asks for it; gzip when accepted).
- 15021 ``/healthz/ready``: 200 "ready" only when the readiness callback says so, else 503 with its reason.
- 15000 on localhost: ``/config_dump`` (JSON from a callback: workloads, policies, certificates,
  attachments; anything that looks like a private key is removed before it is sent) and ``/logging``
  (GET: the levels; POST ``?level=debug`` or ``?agent.proxy=debug``: change them).

Every bind address and port is configurable (port 0 picks one; see ``AdminServer.ports``).

    admin = AdminServer(metrics, ready=lambda: (agent.ready, agent.why_not_ready), config_dump=agent.dump)
    await admin.start()          # or start(metrics=("0.0.0.0", 15020), ready=..., admin=("127.0.0.1", 15000))
    ...
    await admin.close()
"""

from __future__ import annotations

import gzip
import inspect
import json
import logging
import re
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from agent.http import HttpServer, Reply, Request, Routes, json_reply, text_reply
from agent.mesh.model import Address
from agent.telemetry.exposition import negotiate
from agent.telemetry.metrics import Metrics
from hbone import format_address

log = logging.getLogger(__name__)

Readiness = tuple[bool, str]
ReadyCheck = Callable[[], Readiness | Awaitable[Readiness]]
ConfigDump = Callable[[], Mapping[str, Any] | Awaitable[Mapping[str, Any]]]

METRICS_ADDRESS: Address = ("0.0.0.0", 15020)
READY_ADDRESS: Address = ("0.0.0.0", 15021)
ADMIN_ADDRESS: Address = ("127.0.0.1", 15000)

REDACTED = "[redacted]"
_SECRET_KEY = re.compile(r"private|secret|^key$|^key_pem$|_key_pem$|^token$", re.IGNORECASE)
_LEVELS = ("critical", "error", "warning", "info", "debug")
_LOGGERS = ("root", "agent", "hbone")


def scrub(value: Any) -> Any:
    """A JSON-able copy without private keys or secrets: keys named like them lose their value, and any
    string holding a PEM private key is replaced."""
    if isinstance(value, Mapping):
        return {str(k): (REDACTED if _SECRET_KEY.search(str(k)) else scrub(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [scrub(v) for v in value]
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    if isinstance(value, str) and "PRIVATE KEY-----" in value:
        return REDACTED
    return value


async def _call(fn: Callable[[], Any]) -> Any:
    result = fn()
    return await result if inspect.isawaitable(result) else result


class AdminServer:
    """The metrics, readiness and admin endpoints of one agent."""

    def __init__(self, metrics: Metrics, *, ready: ReadyCheck, config_dump: ConfigDump | None = None) -> None:
        self.metrics = metrics
        self._ready = ready
        self._config_dump = config_dump
        self._servers: list[HttpServer] = []
        self.ports: dict[str, int] = {}

    # -- handlers ----------------------------------------------------------------------------------------------
    async def _metrics(self, request: Request) -> Reply:
        encoder, content_type = negotiate(request.headers.get("accept", ""))
        body = encoder(self.metrics.families())
        if "gzip" in request.headers.get("accept-encoding", ""):
            return Reply(200, gzip.compress(body, compresslevel=6), content_type,
                         [("Content-Encoding", "gzip"), ("Vary", "Accept-Encoding")])
        return Reply(200, body, content_type)

    async def _healthz(self, request: Request) -> Reply:
        try:
            ok, reason = await _call(self._ready)
        except Exception as e:  # a failing check is a "not ready", with the error as reason
            log.exception("readiness check failed")
            ok, reason = False, f"readiness check failed: {e}"
        if ok:
            return text_reply("ready\n")
        return text_reply(f"not ready: {reason}\n", 503)

    async def _dump(self, request: Request) -> Reply:
        if self._config_dump is None:
            return text_reply("no config dump in this agent\n", 404)
        try:
            dump = scrub(await _call(self._config_dump))
        except Exception as e:
            log.exception("config dump failed")
            return text_reply(f"config dump failed: {e}\n", 500)
        return Reply(200, (json.dumps(dump, indent=2, sort_keys=True, default=str) + "\n").encode(),
                     "application/json; charset=utf-8")

    @staticmethod
    def _levels() -> dict[str, str]:
        out = {}
        for name in _LOGGERS:
            logger = logging.getLogger() if name == "root" else logging.getLogger(name)
            out[name] = logging.getLevelName(logger.getEffectiveLevel()).lower()
        return out

    async def _get_logging(self, request: Request) -> Reply:
        return json_reply(self._levels())

    async def _set_logging(self, request: Request) -> Reply:
        changes: dict[str, str] = {}
        for key, value in request.query.items():
            name = "root" if key == "level" else key
            level = value.lower()
            if level not in _LEVELS:
                return text_reply(f"{key}: level must be one of {', '.join(_LEVELS)}\n", 400)
            if not re.fullmatch(r"root|[A-Za-z_][\w.]*", name):
                return text_reply(f"{key}: not a logger name\n", 400)
            changes[name] = level
        if not changes:
            return text_reply("give ?level=LEVEL or ?<logger>=LEVEL\n", 400)
        for name, level in changes.items():
            (logging.getLogger() if name == "root" else logging.getLogger(name)).setLevel(level.upper())
            log.warning("log level of %s set to %s through the admin port", name, level)
        return json_reply(self._levels())

    # -- serving -------------------------------------------------------------------------------------------------
    async def _serve(self, name: str, routes: Routes, address: Address | str) -> None:
        """Serve ``routes`` on a TCP address, or on a unix socket path (reachable across network namespaces)."""
        server = HttpServer(name, routes)
        self._servers.append(server)
        if isinstance(address, str):
            await server.serve_unix(address)
            log.info("%s on unix:%s", name, address)
            return
        host, port = address
        # reuse_port: during an upgrade the next agent serves these ports beside this one until it stops
        sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                    reuse_port=True)
        await server.serve(sock)
        self.ports[name] = int(sock.getsockname()[1])
        log.info("%s on %s", name, format_address(host, self.ports[name]))

    async def start(self, *, metrics: Address | None = METRICS_ADDRESS, ready: Address | None = READY_ADDRESS,
                    admin: Address | None = ADMIN_ADDRESS, admin_socket: str | None = None) -> None:
        """Serve each endpoint group on its address (None: not at all); the admin group also on a unix socket
        (and metrics there too, so that one socket answers ``ambit status`` and a scrape in the lab)."""
        try:
            if admin_socket is not None:
                await self._serve("admin-socket", {("GET", "/config_dump"): self._dump,
                                                   ("GET", "/metrics"): self._metrics,
                                                   ("GET", "/healthz/ready"): self._healthz}, admin_socket)
            if metrics is not None:
                await self._serve("metrics", {("GET", "/metrics"): self._metrics}, metrics)
            if ready is not None:
                await self._serve("ready", {("GET", "/healthz/ready"): self._healthz}, ready)
            if admin is not None:
                await self._serve("admin", {("GET", "/config_dump"): self._dump,
                                            ("GET", "/logging"): self._get_logging,
                                            ("POST", "/logging"): self._set_logging}, admin)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        for server in reversed(self._servers):
            await server.close()
        self._servers.clear()
