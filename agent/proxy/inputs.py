"""What the destination side knows of a connection, whatever carried it (HBONE, plaintext, same node): the
policy engine's input, the same for every way in."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from agent.mesh.model import Address
from hbone import canonical_ip
from hbone.identity import SpiffeId

_FORWARDED_FOR = re.compile(r'for="?(?:\[([0-9A-Fa-f:.]+)\]|([0-9.]+)):([0-9]{1,5})"?')  # [v6]:port or v4:port
_FORWARDED_HOST = re.compile(r';\s*host="?([A-Za-z0-9.-]+)"?')


@dataclass(slots=True)
class Connection:
    """Immutable by convention (one is made per connection; a frozen dataclass costs twice as much to make)."""

    peer: SpiffeId | None  # the client's identity, proven by mutual TLS (or known on the same node); None: plaintext
    client: Address  # the calling pod's address as its flows show it
    target: Address  # the pod and port the connection is for (after any Service resolution)
    service: str | None = None  # the hostname of the Service the client called, when known


def forwarded_client(headers: Mapping[str, str], source: Address) -> Address:
    """The caller's address: the tunnel's L3 source, with the application's own port from ``forwarded: for=``
    when that names the same IP (the tunnel's port is the agent's); IPv6 compared as addresses, not as text."""
    m = _FORWARDED_FOR.search(headers.get("forwarded", ""))
    if m is None:
        return source
    named = m.group(2) or m.group(1)
    if named != source[0] and m.group(1):
        try:
            named = canonical_ip(named)
        except ValueError:
            return source
    return (source[0], int(m.group(3))) if named == source[0] else source


def forwarded_host(headers: Mapping[str, str]) -> str | None:
    """The Service hostname the source agent resolved (``forwarded: ...;host=<fqdn>``), if it sent one."""
    m = _FORWARDED_HOST.search(headers.get("forwarded", ""))
    return m.group(1) if m is not None else None
