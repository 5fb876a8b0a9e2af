"""Socket addresses as text, for both IP families: ``ip:port`` and ``[ipv6]:port`` (RFC 3986 section 3.2.2),
and one canonical spelling of an IP, so that the same address always compares equal as a string.

A dual-stack (AF_INET6) socket shows an IPv4 peer as ``::ffff:a.b.c.d``; ``canonical_ip`` turns that back into
``a.b.c.d`` (ztunnel's ``socket::to_canonical``), so IPv4 is spelled one way whichever socket carried it.
"""

from __future__ import annotations

import ipaddress

Address = tuple[str, int]
_MAPPED = "::ffff:"


def canonical_ip(text: str) -> str:
    """``text`` as Python's ``ipaddress`` spells it, an IPv4-mapped IPv6 address as its IPv4 address. Text without
    a colon is returned as it is, unchecked (the kernel and ``ipaddress`` spell IPv4 alike, and this runs per
    connection); ValueError for text with a colon that is not an IPv6 address."""
    if ":" not in text:
        return text
    ip = ipaddress.IPv6Address(text)
    mapped = ip.ipv4_mapped
    return str(mapped) if mapped is not None else str(ip)


def canonical_address(address: tuple[str, int] | tuple[str, int, int, int]) -> Address:
    """(ip, port) of a socket address as the kernel gave it (an AF_INET6 one has four fields), the IP canonical.
    The kernel spells IPv6 as ``ipaddress`` does (RFC 5952: lowercase, the longest run of zeros compressed,
    the first on a tie) except for the IPv4-embedded forms, its only ones with a dot: those are parsed, the
    others kept as they are (parsing costs 5 us, this runs twice per accepted connection)."""
    host, port = address[0], address[1]
    if "." not in host or ":" not in host:
        return host, port
    if host.startswith(_MAPPED) and host.count(":") == 3:  # ::ffff:a.b.c.d: an IPv4 peer of a dual-stack socket
        return host[len(_MAPPED):], port
    return canonical_ip(host), port


def format_address(host: str, port: int) -> str:
    """``host:port``, or ``[host]:port`` when ``host`` is an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_host_port(text: str, what: str = "address", *, listen: bool = False) -> tuple[str, int]:
    """``host:port`` or ``[ipv6]:port`` (the host a name or an IP) into (host, port); an IPv6 host is returned
    without its brackets; ``listen``: port 0 (any free port) is allowed. ValueError naming ``what`` and saying
    what is wrong otherwise."""
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ValueError(f"{what} {text!r}: '[' without its closing ']'")
        host, rest = text[1:close], text[close + 1:]
        if not rest.startswith(":"):
            raise ValueError(f"{what} {text!r}: ']' must be followed by ':PORT'")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{what} {text!r}: brackets hold an IPv6 address, not {host!r}") from None
        port_text = rest[1:]
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon or not host:
            raise ValueError(f"{what} {text!r} is not HOST:PORT")
        if ":" in host or "]" in host:
            raise ValueError(f"{what} {text!r}: an IPv6 address must be written in brackets, [{host}]:{port_text}")
    lowest = 0 if listen else 1
    if not port_text.isascii() or not port_text.isdigit() or len(port_text) > 5 or not lowest <= int(port_text) < 65536:
        raise ValueError(f"{what} {text!r}: the port must be a number {lowest}-65535, not {port_text!r}")
    return host, int(port_text)
