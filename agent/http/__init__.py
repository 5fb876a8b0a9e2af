"""A small HTTP/1.1 client and server on asyncio, with h11 as the codec (protocol logic free of I/O).

What the agent and the CA speak HTTP/1.1 for: the Kubernetes API (agent/kube: TLS with client certificates or
bearer tokens, keep-alive, watch responses streamed line by line) and the admin endpoints (agent/telemetry/admin.py:
Prometheus scrapes, readiness, the config dump), plus ``ambit status`` reading them.

Why not aiohttp, which served both before: memory. In the agent's process aiohttp (with multidict, yarl, frozenlist,
aiosignal, propcache, attrs, aiohappyeyeballs) added 9.4 MiB PSS and 105 modules on top of everything else the agent
imports, against a target of 40 MB for the whole agent (issue 11); h11 adds 0.3 MiB (11 modules), httptools 0.26 MiB
(7), and this package about 0.25 MiB of Python heap. An idle agent went from 60 to 52 MiB PSS. h11 rather than
httptools or a codec of our own: it is the strict, tested, pure-Python sans-I/O codec for both roles (chunked and
Content-Length bodies, keep-alive rules, framing errors named), and speed does not matter here (a few requests a
minute, one scrape every 15 s).
"""

from agent.http.client import HttpClient, Response, Timeouts
from agent.http.errors import CertificateError, ConnectError, HttpError, HttpTimeout, LineTooLong, ProtocolError
from agent.http.proxy import Proxies, ProxyConfigError
from agent.http.server import HttpServer, Reply, Request, Routes, json_reply, text_reply

__all__ = [
    "CertificateError",
    "ConnectError",
    "HttpClient",
    "HttpError",
    "HttpServer",
    "HttpTimeout",
    "LineTooLong",
    "ProtocolError",
    "Proxies",
    "ProxyConfigError",
    "Reply",
    "Request",
    "Response",
    "Routes",
    "Timeouts",
    "json_reply",
    "text_reply",
]
