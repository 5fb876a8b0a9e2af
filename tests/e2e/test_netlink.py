"""The rtnetlink client against the kernel, in a namespace the test makes: what it installs is what `ip` shows,
installing twice adds nothing, removing leaves nothing; refusals name the request and the interface; a namespace
without IPv6 on lo gets the IPv4 half of the policy routing."""

from __future__ import annotations

import errno
import json
import secrets
import socket
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from agent.capture import netns
from agent.capture.routing import PolicyRouting
from agent.capture.rtnl import Rtnl

INGRESS = 0xFFFFFFF2


@pytest.fixture
def ns() -> Iterator[str]:
    name = f"nltest-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "add", "v0", "type", "veth", "peer", "name", "v1"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
    assert name not in netns.list_netns()


def _ip_json(ns: str, *argv: str) -> Any:
    return json.loads(subprocess.run(["ip", "-n", ns, "-j", *argv], check=True, capture_output=True,
                                     text=True).stdout or "[]")


def _ours(ns: str, family: str) -> list[tuple[Any, ...]]:
    rules = [(r["priority"], r.get("fwmark"), r.get("iif"), r.get("table"), r.get("goto"))
             for r in _ip_json(ns, family, "rule", "show") if r.get("fwmark")]
    routes = [(r["type"], r["dst"], r["dev"]) for r in _ip_json(ns, family, "route", "show", "table", "100")]
    return sorted(rules, key=lambda r: int(r[0])) + routes


def _rtnl(ns: str) -> Rtnl:
    with netns.entered(ns):
        return Rtnl()


def test_policy_routing_is_what_ip_shows_idempotent_and_removed_whole(ns: str) -> None:
    with _rtnl(ns) as rtnl:
        routing = PolicyRouting(rtnl, 0x539)
        routing.install()
        first = {f: _ours(ns, f) for f in ("-4", "-6")}
        routing.install()  # a restarted agent over its predecessor's rules: nothing doubled
        assert {f: _ours(ns, f) for f in ("-4", "-6")} == first
        assert first["-4"] == [
            (99, "0x539", "lo", None, 32766),
            (100, "0x539", None, "100", None),
            ("local", "default", "lo"),
        ]
        assert first["-6"] == first["-4"]
        assert _ip_json(ns, "link", "show", "lo")[0]["operstate"] in ("UNKNOWN", "UP")
        routing.remove()
        assert _ours(ns, "-4") == [] and _ours(ns, "-6") == []
        assert rtnl.routes(socket.AF_INET, 100) == []  # the table is gone: ENOENT from the kernel, [] here


def test_without_ipv6_on_lo_the_ipv4_half_is_installed(ns: str) -> None:
    netns.sysctl_write(ns, "net.ipv6.conf.lo.disable_ipv6", "1")
    with _rtnl(ns) as rtnl:
        routing = PolicyRouting(rtnl, 0x539)
        routing.install()
        assert len(_ours(ns, "-4")) == 3
        assert [r for r in _ours(ns, "-6") if r[0] == "local"] == []
        routing.remove()
        assert _ours(ns, "-4") == []


def test_refusals_name_the_request_and_the_interface(ns: str) -> None:
    with _rtnl(ns) as rtnl:
        ix = rtnl.link(name="v0").index
        rtnl.clsact(True, ix)
        with pytest.raises(OSError) as e:
            rtnl.clsact(True, ix)
        assert e.value.errno == errno.EEXIST
        assert str(e.value).startswith(f"[Errno 17] tc qdisc add clsact on ifindex {ix} (v0): EEXIST (File exists)")
        with pytest.raises(OSError) as e:
            rtnl.del_filter(ix, INGRESS, 1, 0x539)
        assert e.value.errno == errno.ENOENT and f"on ifindex {ix} (v0): ENOENT" in str(e.value)
        assert rtnl.filters(ix, INGRESS) == []
        rtnl.clsact(False, ix)
        with pytest.raises(OSError) as e:
            rtnl.clsact(True, 999)
        assert e.value.errno == errno.ENODEV and "on ifindex 999 (gone): ENODEV" in str(e.value)
        assert rtnl.ifindex("nonexistent0") is None
        with pytest.raises(OSError, match="link get ifindex 999: ENODEV"):
            rtnl.link(999)


def test_links_addresses_and_route_lookups(ns: str) -> None:
    subprocess.run(["ip", "-n", ns, "addr", "add", "10.99.0.1/24", "dev", "v0"], check=True)
    subprocess.run(["ip", "-n", ns, "addr", "add", "fd00:99::1/64", "dev", "v0", "nodad"], check=True)
    for dev in ("v0", "v1"):
        subprocess.run(["ip", "-n", ns, "link", "set", dev, "up"], check=True)
    subprocess.run(["ip", "-n", ns, "route", "add", "default", "via", "10.99.0.254"], check=True)
    with _rtnl(ns) as rtnl:
        v0 = rtnl.link(name="v0")
        assert v0.kind == "veth" and v0.peer == rtnl.link(name="v1").index and v0.peer_nsid is None
        assert {link.name for link in rtnl.links()} == {"lo", "v0", "v1"}
        assert {(a.index, a.address) for a in rtnl.addresses()} >= {(v0.index, "10.99.0.1"), (v0.index, "fd00:99::1")}
        v6 = rtnl.addresses(socket.AF_INET6, v0.index)  # the kernel filters by family and interface
        assert "fd00:99::1" in {a.address for a in v6}
        assert {(a.family, a.index) for a in v6} == {(socket.AF_INET6, v0.index)}
        route = rtnl.route_to("10.99.0.7")
        assert route.oifs == (v0.index,) and route.gateway is None
        via = rtnl.route_to("192.0.2.1")
        assert via.gateway == "10.99.0.254"
        assert [r.oifs for r in rtnl.default_routes(socket.AF_INET)] == [(v0.index,)]
        assert rtnl.default_routes(socket.AF_INET6) == []
