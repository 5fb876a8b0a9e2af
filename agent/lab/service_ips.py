"""A lab Service's IP families and cluster IPs, as the API server sets them (kube-apiserver's Service
allocators, ``initIPFamilyFields`` and ``allocClusterIPs``).

The lab's service ranges: ``SERVICE_CIDR`` (10.96.0.0/16), and in a dual-stack lab also ``SERVICE_CIDR6``
(fd00:96::/112, as kind's dual-stack clusters have one), IPv4 first: IPv4 is the cluster's default family.

* ``spec.ipFamilyPolicy``: the one given; else the one the Service had (an update keeps it, as ``kubectl apply``
  does); else RequireDualStack for a headless Service without selector, SingleStack for any other.
* SingleStack with two cluster IPs or two families is refused; applied again with the two it already has, it
  keeps the first (the way back to single stack).
* ``spec.ipFamilies`` must match ``spec.clusterIPs`` index by index; a cluster IP beyond the families given adds
  its family. A family the lab has no range for is refused, and so is RequireDualStack in an IPv4-only lab;
  PreferDualStack there stays single-stack. Without families: IPv4; PreferDualStack and RequireDualStack add the
  other family when the lab has both.
* Each family's address: the one asked for (in its family's range, neither the range's network address nor, for
  IPv4, its broadcast address), else the one the Service had, else the lowest free address of the range. The
  first (``spec.clusterIP``) never changes, nor does its family; a second one may be added or released (with
  SingleStack) but not changed.
* Headless (``clusterIP: None``): no address, the families as above (they choose the pods' addresses that are
  its endpoints).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from agent.lab.state import object_key
from agent.lab.topology import SERVICE_CIDR, SERVICE_CIDR6
from agent.mesh.convert import ObjectError

HEADLESS = "None"
POLICIES = ("SingleStack", "PreferDualStack", "RequireDualStack")
FAMILIES = {"IPv4": 4, "IPv6": 6}
NAMES = {4: "IPv4", 6: "IPv6"}
OTHER = {4: 6, 6: 4}
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Ranges = Mapping[int, Network]  # IP version -> the service range of that family, the default family first


def ranges(dual_stack: bool) -> Ranges:
    """The service ranges of a lab."""
    return {4: SERVICE_CIDR, 6: SERVICE_CIDR6} if dual_stack else {4: SERVICE_CIDR}


@dataclass
class Request:
    """What a Service gets: its policy, its families in order, and for each the address asked for or kept
    (None: one to allocate); a headless Service has no address."""

    policy: str
    families: list[int]
    ips: list[str | None]
    headless: bool


def _field(i: int, listed: bool) -> str:
    return f"spec.clusterIPs[{i}]" if listed or i else "spec.clusterIP"


def _asked(spec: Mapping[str, Any], where: str) -> tuple[list[str], bool]:
    """The cluster IPs the Service names (``spec.clusterIPs``, else ``spec.clusterIP``), checked for form; and
    whether they came from ``spec.clusterIPs`` (which the errors then name)."""
    single, several = spec.get("clusterIP"), spec.get("clusterIPs")
    if single not in (None, "") and not isinstance(single, str):
        raise ObjectError(f"{where}: spec.clusterIP must be a string, not {type(single).__name__}")
    if several is not None:
        if not isinstance(several, list) or not all(isinstance(ip, str) for ip in several):
            raise ObjectError(f"{where}: spec.clusterIPs must be a list of strings")
        if several and single not in (None, "", several[0]):
            raise ObjectError(f"{where}: spec.clusterIPs[0] {several[0]!r} must equal spec.clusterIP {single!r}")
    listed = bool(several)
    asked: list[str] = list(several) if several else ([single] if single else [])
    if len(asked) > 2:
        raise ObjectError(f"{where}: spec.clusterIPs holds at most two addresses (one per family), not {asked}")
    if HEADLESS in asked and asked != [HEADLESS]:
        raise ObjectError(f"{where}: spec.clusterIPs: None must be the only entry, not {asked}")
    for i, ip in enumerate(asked):
        if ip == HEADLESS:
            continue
        try:
            asked[i] = str(ipaddress.ip_address(ip))
        except ValueError:
            raise ObjectError(f"{where}: {_field(i, listed)} {ip!r} is not an IP address") from None
    if len(asked) == 2 and _family(asked[0]) == _family(asked[1]):
        raise ObjectError(f"{where}: spec.clusterIPs[1] {asked[1]} is of the family of spec.clusterIPs[0]: "
                          "a Service has one cluster IP of each family")
    return asked, listed


def _family(ip: str) -> int:
    return ipaddress.ip_address(ip).version


def _families(spec: Mapping[str, Any], where: str) -> list[int]:
    given = spec.get("ipFamilies")
    if given is None:
        return []
    if not isinstance(given, list):
        raise ObjectError(f"{where}: spec.ipFamilies must be a list, not {type(given).__name__}")
    found: list[int] = []
    for i, name in enumerate(given):
        family = FAMILIES.get(name) if isinstance(name, str) else None
        if family is None or family in found:
            raise ObjectError(f"{where}: spec.ipFamilies[{i}] must be IPv4 or IPv6, each once, not {name!r}")
        found.append(family)
    return found


def current(obj: Mapping[str, Any] | None) -> list[str]:
    """The cluster IPs a stored Service has (``["None"]`` when headless)."""
    spec = (obj or {}).get("spec") or {}
    ips = spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else [])
    return [ip for ip in ips if isinstance(ip, str)]


def _policy(spec: Mapping[str, Any], old: Mapping[str, Any] | None, headless: bool, where: str) -> str:
    policy = spec.get("ipFamilyPolicy") or ((old or {}).get("spec") or {}).get("ipFamilyPolicy")
    if policy is None:
        return "RequireDualStack" if headless and not spec.get("selector") else "SingleStack"
    if policy not in POLICIES:
        raise ObjectError(f"{where}: spec.ipFamilyPolicy must be {', '.join(POLICIES)}, not {policy!r}")
    return str(policy)


def request(obj: Mapping[str, Any], old: Mapping[str, Any] | None, lab: Ranges) -> Request:
    """The families and addresses a (non-ExternalName) Service asks for, given the one stored under its name
    (``old``, None when new), validated as the API server validates them."""
    kind, namespace, name = object_key(obj)
    where, spec = f"{kind} {namespace}/{name}", obj["spec"]
    asked, listed = _asked(spec, where)
    families = _families(spec, where)
    headless = asked == [HEADLESS]
    policy = _policy(spec, old, headless, where)
    before = current(old) if old is not None and (old.get("spec") or {}).get("type") != "ExternalName" else []
    before_families = _families((old or {}).get("spec") or {}, where) if before else []
    if policy == "SingleStack":
        if before and asked == before and len(asked) == 2:
            asked = asked[:1]  # releasing the second address
        if before and families == before_families and len(families) == 2:
            families = families[:1]
        for field, count in (("cluster IPs", len(asked)), ("IP families", len(families))):
            if count == 2:
                raise ObjectError(f"{where}: spec.ipFamilyPolicy SingleStack: must be RequireDualStack or "
                                  f"PreferDualStack when two {field} are given")
    elif before and 0 < len(asked) < len(before):
        raise ObjectError(f"{where}: spec.ipFamilyPolicy {policy}: must be SingleStack to release the second "
                          "cluster IP")
    for i, ip in enumerate(a for a in asked if a != HEADLESS):
        if i < len(families) and _family(ip) != families[i]:
            raise ObjectError(f"{where}: spec.clusterIPs[{i}] {ip} is not of spec.ipFamilies[{i}] "
                              f"{NAMES[families[i]]}")
        if i >= len(families):
            if _family(ip) not in lab:
                raise ObjectError(f"{where}: {_field(i, listed)} {ip}: {NAMES[_family(ip)]} is not configured in "
                                  "this lab (IPv4 only; ambit lab up --dual-stack has IPv6 too)")
            families.append(_family(ip))
    default = next(iter(lab))
    if headless and not spec.get("selector"):  # any families, whatever the lab has: they pick endpoints only
        families = families or [default]
        if policy != "SingleStack" and len(families) == 1:
            families.append(OTHER[families[0]])
        return Request(policy, families, [], True)
    if policy == "RequireDualStack" and len(lab) < 2:
        raise ObjectError(f"{where}: spec.ipFamilyPolicy RequireDualStack: the lab is not dual-stack "
                          "(ambit lab up --dual-stack)")
    for i, family in enumerate(families):
        if family not in lab:
            raise ObjectError(f"{where}: spec.ipFamilies[{i}] {NAMES[family]} is not configured in this lab "
                              "(IPv4 only; ambit lab up --dual-stack has IPv6 too)")
    families = families or [default]
    if policy != "SingleStack" and len(families) == 1 and len(lab) == 2:
        families.append(OTHER[families[0]])
    if headless:
        return Request(policy, families, [], True)
    return Request(policy, families, _addresses(where, families, asked, listed, before, lab), False)


def _addresses(where: str, families: list[int], asked: list[str], listed: bool, before: list[str],
               lab: Ranges) -> list[str | None]:
    """Each family's address: asked for (and in range), else kept, else None (to allocate); the first never
    changes, a second may come or go but not change."""
    kept = {_family(ip): ip for ip in before if ip != HEADLESS}
    ips: list[str | None] = []
    for i, family in enumerate(families):
        ip = asked[i] if i < len(asked) else None
        if ip is not None and not usable(ipaddress.ip_address(ip), lab[family]):
            raise ObjectError(f"{where}: {_field(i, listed)} {ip} is not in the service range {lab[family]}")
        was = before[0] if i == 0 and before else kept.get(family)
        if was is not None and ip is not None and ip != was:
            if i == 0:
                raise ObjectError(f"{where}: spec.clusterIP: field is immutable ({was}, not {ip})")
            raise ObjectError(f"{where}: spec.clusterIPs[{i}]: may not change once set ({was}, not {ip})")
        if i == 0 and was is not None and was != HEADLESS and _family(was) != family:
            raise ObjectError(f"{where}: spec.ipFamilies[0]: field is immutable ({NAMES[_family(was)]}, not "
                              f"{NAMES[family]})")
        ips.append(ip or (was if was != HEADLESS else None))
    return ips


def usable(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, network: Network) -> bool:
    """An address the allocator may hand out: in the range, not its network address (nor IPv4's broadcast)."""
    return (ip.version == network.version and ip in network and ip != network.network_address
            and (ip.version == 6 or ip != network.broadcast_address))


class Allocator:
    """The cluster IPs in use (address -> "ns/name") and the next candidate of each family for a new one."""

    def __init__(self, services: Iterable[Mapping[str, Any]], lab: Ranges) -> None:
        self.used: dict[str, str] = {}
        for obj in services:
            _kind, namespace, name = object_key(obj)
            for ip in current(obj):
                if ip != HEADLESS:
                    self.used[ip] = f"{namespace}/{name}"
        self.ranges = lab
        self._hosts: dict[int, Iterator[ipaddress.IPv4Address | ipaddress.IPv6Address]] = {
            family: network.hosts() for family, network in lab.items()}

    def take(self, ip: str, owner: str, where: str, field: str) -> None:
        holder = self.used.get(ip)
        if holder is not None and holder != owner:
            raise ObjectError(f"{where}: {field} {ip} is already allocated to Service {holder}")
        self.used[ip] = owner

    def allocate(self, family: int, owner: str, where: str, field: str) -> str:
        for candidate in self._hosts[family]:
            ip = str(candidate)
            if ip not in self.used:
                self.used[ip] = owner
                return ip
        raise ObjectError(f"{where}: {field}: the service range {self.ranges[family]} is full")


def write(spec: dict[str, Any], req: Request) -> None:
    """Complete a Service's spec with its families, policy and addresses (all allocated by now)."""
    ips = [HEADLESS] if req.headless else [ip for ip in req.ips if ip is not None]
    assert req.headless or len(ips) == len(req.families), "every family has its address"
    spec["clusterIP"], spec["clusterIPs"] = ips[0], ips
    spec["ipFamilies"], spec["ipFamilyPolicy"] = [NAMES[f] for f in req.families], req.policy
