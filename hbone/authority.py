"""The target of a CONNECT request: an IP address and port, as HBONE carries it in ``:authority``."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

_AUTHORITY_RE = re.compile(r"(?:\[([0-9A-Fa-f:.]+)\]|([0-9.]+)):([0-9]{1,5})", re.ASCII)


@dataclass(frozen=True, slots=True)
class Authority:
    """A CONNECT target ``ip:port`` (``[v6]:port`` for IPv6)."""

    ip: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Authority:
        m = _AUTHORITY_RE.fullmatch(text)
        if m is None:
            raise ValueError(f"authority {text!r} is not ip:port (or [ipv6]:port)")
        try:
            ip: ipaddress.IPv4Address | ipaddress.IPv6Address = (
                ipaddress.IPv6Address(m.group(1)) if m.group(1) else ipaddress.IPv4Address(m.group(2)))
        except ValueError:
            raise ValueError(f"authority {text!r} does not name an IP address") from None
        port = int(m.group(3))
        if not 0 < port < 65536:
            raise ValueError(f"authority {text!r} has port out of range")
        return cls(str(ip), port)

    def __str__(self) -> str:
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"
