"""``hbone.addresses``: host:port text for both families, and one spelling per IP."""

from __future__ import annotations

import ipaddress
import random
import socket

import pytest

from hbone.addresses import canonical_address, canonical_ip, format_address, parse_host_port
from hbone.client import request_headers


@pytest.mark.parametrize(("text", "host", "port"), [
    ("10.0.0.1:80", "10.0.0.1", 80),
    ("[fd00::1]:8080", "fd00::1", 8080),
    ("[::]:15008", "::", 15008),
    ("localhost:15012", "localhost", 15012),
    ("ambit-ca.ambit-system.svc:15012", "ambit-ca.ambit-system.svc", 15012),
])
def test_parse_host_port(text: str, host: str, port: int) -> None:
    assert parse_host_port(text) == (host, port)
    assert format_address(host, port) == text


@pytest.mark.parametrize(("text", "why"), [
    ("fd00::1:80", "an IPv6 address must be written in brackets, [fd00::1]:80"),
    ("[fd00::1:80", "'[' without its closing ']'"),
    ("[fd00::1]80", "']' must be followed by ':PORT'"),
    ("[web]:80", "brackets hold an IPv6 address, not 'web'"),
    ("[10.0.0.1]:80", "brackets hold an IPv6 address, not '10.0.0.1'"),
    ("10.0.0.1", "is not HOST:PORT"),
    (":80", "is not HOST:PORT"),
    ("10.0.0.1:", "the port must be a number 1-65535, not ''"),
    ("10.0.0.1:0", "the port must be a number 1-65535, not '0'"),
    ("10.0.0.1:65536", "the port must be a number 1-65535"),
    ("10.0.0.1:\u0661\u0662", "the port must be a number"),  # Arabic-Indic digits: isdigit() but not ASCII
    ("web]:80", "an IPv6 address must be written in brackets"),
])
def test_parse_host_port_says_what_is_wrong(text: str, why: str) -> None:
    with pytest.raises(ValueError) as raised:
        parse_host_port(text, "--ca")
    assert str(raised.value).startswith(f"--ca {text!r}") and why in str(raised.value), raised.value


def test_a_listening_address_may_take_any_port() -> None:
    assert parse_host_port("[::1]:0", listen=True) == ("::1", 0)
    with pytest.raises(ValueError):
        parse_host_port("[::1]:0")


@pytest.mark.parametrize(("given", "canonical"), [
    ("10.0.0.1", "10.0.0.1"),
    ("FD00:0200:0000:0000::0010", "fd00:200::10"),
    ("::ffff:10.0.0.1", "10.0.0.1"),        # the kernel's spelling of an IPv4 peer of a dual-stack socket
    ("::ffff:a00:1", "10.0.0.1"),           # the same address spelled as ipaddress does
    ("::1", "::1"),
    ("fe80::1%eth0", "fe80::1%eth0"),
])
def test_canonical_ip(given: str, canonical: str) -> None:
    assert canonical_ip(given) == canonical


def test_canonical_ip_refuses_what_is_not_an_ipv6_address() -> None:
    with pytest.raises(ValueError):
        canonical_ip("fd00::1::2")


@pytest.mark.parametrize(("address", "expected"), [
    (("10.0.0.1", 80), ("10.0.0.1", 80)),
    (("::ffff:10.0.0.1", 80, 0, 0), ("10.0.0.1", 80)),
    (("fd00::1", 443, 0, 0), ("fd00::1", 443)),
    (("::1.2.3.4", 443, 0, 0), ("::102:304", 443)),  # the kernel's dotted IPv4-compatible form, as ipaddress spells it
])
def test_canonical_address_of_either_family(address: tuple[str, int] | tuple[str, int, int, int],
                                            expected: tuple[str, int]) -> None:
    assert canonical_address(address) == expected


def test_forwarded_for_brackets_an_ipv6_client() -> None:
    assert request_headers(("fd00:200:1::11", 40000))["forwarded"] == 'for="[fd00:200:1::11]:40000"'
    assert request_headers(("10.200.0.11", 40000), "web.shop.svc.cluster.local")["forwarded"] == \
        'for="10.200.0.11:40000";host=web.shop.svc.cluster.local'


def test_the_kernels_spelling_of_ipv6_is_kept_only_where_it_is_already_canonical() -> None:
    """``canonical_address`` trusts inet_ntop's text unless it has a dot: random addresses rich in zero runs
    (mapped, compatible and plain ones among them) read the same as a full parse would give."""
    rng = random.Random(7)
    for _ in range(20000):
        packed = b"".join(rng.choice([0, 0, 0, 0xFFFF, rng.randrange(65536)]).to_bytes(2, "big") for _ in range(8))
        kernel = socket.inet_ntop(socket.AF_INET6, packed)
        parsed = ipaddress.IPv6Address(packed)
        expected = str(parsed.ipv4_mapped) if parsed.ipv4_mapped is not None else str(parsed)
        assert canonical_address((kernel, 1, 0, 0)) == (expected, 1), kernel
