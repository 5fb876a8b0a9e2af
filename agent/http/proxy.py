"""Which requests go through a proxy, as ``HTTPS_PROXY``, ``HTTP_PROXY`` and ``NO_PROXY`` say (as Go's net/http and
so kubectl and client-go read them): https URLs through an HTTP CONNECT tunnel, http URLs in absolute form.

``NO_PROXY`` is a comma-separated list of ``*`` (no proxy at all), IP addresses, CIDR ranges, and domain names
(``example.com`` and ``.example.com`` both match example.com's subdomains, the former example.com too), each
optionally with ``:port``. Only ``http://`` proxies are supported (with ``user:password@``, sent as Basic
authorization); anything else is an error naming the variable, not a silent direct connection.
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit


class ProxyConfigError(ValueError):
    """A proxy variable that cannot be used; the message names it."""


@dataclass(frozen=True, slots=True)
class Proxy:
    host: str
    port: int
    authorization: str | None  # a Proxy-Authorization value
    variable: str  # where it came from, for messages

    def __str__(self) -> str:
        return f"proxy {self.host}:{self.port} (${self.variable})"


@dataclass(frozen=True, slots=True)
class Proxies:
    https: str | None = None
    http: str | None = None
    no_proxy: str = ""

    @classmethod
    def from_environ(cls, env: Mapping[str, str]) -> Proxies:
        def get(name: str) -> str | None:
            return env.get(name) or env.get(name.lower()) or None

        return cls(get("HTTPS_PROXY"), get("HTTP_PROXY"), get("NO_PROXY") or "")

    def for_url(self, scheme: str, host: str, port: int) -> Proxy | None:
        """The proxy for a request to ``scheme://host:port``, or None to connect directly."""
        url, variable = (self.https, "HTTPS_PROXY") if scheme == "https" else (self.http, "HTTP_PROXY")
        if not url or _bypassed(self.no_proxy, host, port):
            return None
        return _parse(url, variable)


def _parse(url: str, variable: str) -> Proxy:
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme != "http":
        raise ProxyConfigError(f"${variable}={url!r}: only http:// proxies are supported")
    try:
        port = parts.port or 80
    except ValueError:
        raise ProxyConfigError(f"${variable}={url!r}: bad port") from None
    if not parts.hostname:
        raise ProxyConfigError(f"${variable}={url!r}: no host")
    authorization = None
    if parts.username is not None:
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        authorization = "Basic " + base64.b64encode(pair.encode()).decode()
    return Proxy(parts.hostname, port, authorization, variable)


def _bypassed(no_proxy: str, host: str, port: int) -> bool:
    host = host.lower().strip("[]")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for entry in (e.strip().lower() for e in no_proxy.split(",")):
        if not entry:
            continue
        if entry == "*":
            return True
        name, entry_port = entry, None
        if entry.startswith("[") and "]" in entry:  # [v6]:port
            name, _, rest = entry[1:].partition("]")
            entry_port = rest.removeprefix(":") or None
        elif entry.count(":") == 1:  # name:port or v4:port
            name, entry_port = entry.split(":")
        if entry_port is not None and entry_port != str(port):
            continue
        if address is not None:
            try:
                if address in ipaddress.ip_network(name, strict=False):
                    return True
            except ValueError:
                pass
            continue
        domain = name.removeprefix("*").removeprefix(".")
        if host == domain and not name.startswith("."):
            return True
        if host.endswith(f".{domain}"):
            return True
    return False
