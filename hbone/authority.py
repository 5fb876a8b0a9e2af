"""The target of a CONNECT request: an IP address and port, as HBONE carries it in ``:authority``."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from hbone.addresses import format_address

_AUTHORITY_RE = re.compile(r"(?:\[([0-9A-Fa-f:.]+)\]|([0-9.]+)):([0-9]{1,5})", re.ASCII)


def _problem(text: str) -> str:
    """What is wrong with an authority the pattern refused, for the 400's reason and the log."""
    host = text.rpartition(":")[0]
    if "%" in text:
        return "names an IPv6 zone (%...): a pod address has none"
    if text.startswith("[") and "]" not in text:
        return "has '[' without its closing ']'"
    if text.startswith("[") and not re.fullmatch(r"\[[^\]]*\]:.*", text, re.ASCII):
        return "must be [ipv6]:port: ']' is not followed by ':port'"
    if "]" in text and not text.startswith("["):
        return "has ']' without '['"
    if ":" not in text:
        return "has no ':port'"
    port = text.rpartition(":")[2]
    if not (port.isascii() and port.isdigit()):
        return "has no port number after its last ':'"
    if not text.startswith("[") and ":" in host:
        return "is IPv6 without brackets: write [ipv6]:port (RFC 3986 section 3.2.2)"
    return "is not ip:port (or [ipv6]:port)"


@dataclass(frozen=True, slots=True)
class Authority:
    """A CONNECT target ``ip:port`` (``[v6]:port`` for IPv6)."""

    ip: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Authority:
        """``text`` as an Authority; ValueError saying what is wrong. Valid ones are remembered (a server sees
        the same few pod addresses on every stream; parsing an IP costs more than the rest of a request)."""
        known = _PARSED.get(text)
        if known is not None:
            return known
        parsed = cls._parse(text)
        if len(_PARSED) >= _PARSED_MAX:
            _PARSED.clear()
        _PARSED[text] = parsed
        return parsed

    @classmethod
    def _parse(cls, text: str) -> Authority:
        m = _AUTHORITY_RE.fullmatch(text)
        if m is None:
            raise ValueError(f"authority {text!r} {_problem(text)}")
        try:
            ip: ipaddress.IPv4Address | ipaddress.IPv6Address = (
                ipaddress.IPv6Address(m.group(1)) if m.group(1) else ipaddress.IPv4Address(m.group(2)))
        except ValueError:
            hint = ": brackets hold an IPv6 address only" if m.group(1) else ""
            raise ValueError(f"authority {text!r} does not name an IP address{hint}") from None
        port = int(m.group(3))
        if not 0 < port < 65536:
            raise ValueError(f"authority {text!r} has port out of range")
        return cls(str(ip), port)

    def __str__(self) -> str:
        return format_address(self.ip, self.port)


_PARSED: dict[str, Authority] = {}
_PARSED_MAX = 4096
