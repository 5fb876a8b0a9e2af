"""rtnetlink: the requests the capture makes (links, addresses, routes, rules, tc clsact qdiscs and bpf filters)
as pure builders and parsers, laid out as ``ip`` and ``tc`` lay them out, and `Rtnl`, which sends them on a
`netlink.NetlinkSocket`. Errors name the request and its object ("tc filter replace on ifindex 7 (veth1)").
"""

from __future__ import annotations

import errno
import socket
import struct
from dataclasses import dataclass

from agent.capture import netlink as nl
from agent.capture.netlink import Message, Request

RTM_NEWLINK, RTM_GETLINK = 16, 18
RTM_GETADDR = 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_GETNEIGH = 30
RTM_NEWRULE, RTM_DELRULE, RTM_GETRULE = 32, 33, 34
RTM_NEWQDISC, RTM_DELQDISC = 36, 37
RTM_NEWTFILTER, RTM_DELTFILTER, RTM_GETTFILTER = 44, 45, 46

IFF_UP = 0x1
IFLA_ADDRESS, IFLA_IFNAME, IFLA_LINK, IFLA_MASTER, IFLA_LINKINFO, IFLA_LINK_NETNSID = 1, 3, 5, 10, 18, 37
IFLA_EXT_MASK = 29
RTEXT_FILTER_SKIP_STATS = 0x8  # links without their counters: a fifth of the bytes to read
IFLA_INFO_KIND = 1
IFA_ADDRESS, IFA_LOCAL, IFA_TARGET_NETNSID = 1, 2, 10
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_MULTIPATH, RTA_TABLE = 1, 4, 5, 9, 15
RTN_UNICAST, RTN_LOCAL = 1, 2
RTPROT_BOOT = 3
RT_SCOPE_UNIVERSE, RT_SCOPE_HOST = 0, 254
RT_TABLE_UNSPEC, RT_TABLE_MAIN = 0, 254
RTM_F_LOOKUP_TABLE = 0x1000
FRA_IIFNAME, FRA_GOTO, FRA_PRIORITY, FRA_FWMARK, FRA_TABLE, FRA_FWMASK = 3, 4, 6, 10, 15, 16
FR_ACT_UNSPEC, FR_ACT_TO_TBL, FR_ACT_GOTO = 0, 1, 2
NDA_DST, NDA_LLADDR, NDA_MASTER = 1, 2, 9
NUD_UNRESOLVED = 0x01 | 0x20  # NUD_INCOMPLETE | NUD_FAILED: no usable link-layer address
AF_BRIDGE = 7
TCA_KIND, TCA_OPTIONS = 1, 2
TCA_BPF_CLASSID, TCA_BPF_FD, TCA_BPF_NAME, TCA_BPF_FLAGS = 3, 6, 7, 8
TCA_BPF_FLAG_ACT_DIRECT = 1
TC_H_CLSACT = 0xFFFFFFF1
CLSACT_HANDLE = 0xFFFF0000
ETH_P_ALL = 0x0003

IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
IFADDRMSG = struct.Struct("=BBBBi")  # family, prefixlen, flags, scope, index
RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol, scope, type, flags
FIB_RULE_HDR = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, res1, res2, action, flags
NDMSG = struct.Struct("=BxxxiHBB")  # family, ifindex, state, flags, type
TCMSG = struct.Struct("=BxxxiIII")  # family, ifindex, handle, parent, info
RTNEXTHOP = struct.Struct("=HBBi")  # len, flags, hops, ifindex

_GET, _DUMP, _ACK = nl.NLM_F_REQUEST, nl.NLM_F_REQUEST | nl.NLM_F_DUMP, nl.NLM_F_REQUEST | nl.NLM_F_ACK
_CREATE = _ACK | nl.NLM_F_CREATE | nl.NLM_F_EXCL
_REPLACE = _ACK | nl.NLM_F_CREATE | nl.NLM_F_REPLACE
_ADDR_LEN: dict[int, int] = {socket.AF_INET: 4, socket.AF_INET6: 16}
_SKIP_STATS = nl.attr_u32(IFLA_EXT_MASK, RTEXT_FILTER_SKIP_STATS)


def family_of(ip: str) -> int:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def _ip(family: int, raw: bytes | None) -> str | None:
    if raw is None:
        return None
    if len(raw) != _ADDR_LEN.get(family, -1):
        raise nl.malformed(f"address of {len(raw)} bytes for family {family}")
    return socket.inet_ntop(family, raw)


# -- links -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Link:
    index: int
    name: str
    kind: str | None  # IFLA_INFO_KIND: "veth", "bridge"...; None for a device without one (lo, a physical NIC)
    master: int  # the bridge (or bond...) it is enslaved to; 0: none
    peer: int  # IFLA_LINK: a veth's peer ifindex (in the peer's namespace)
    peer_nsid: int | None  # IFLA_LINK_NETNSID: the peer namespace's id here; None: the same namespace
    address: bytes  # IFLA_ADDRESS: the link-layer address
    flags: int


def get_link(index: int = 0, name: str | None = None) -> Request:
    """One link by index or by name (ENODEV when there is none)."""
    body = IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, 0, 0) + _SKIP_STATS
    body += nl.attr_str(IFLA_IFNAME, name) if name else b""
    return Request(f"link get {name or f'ifindex {index}'}", RTM_GETLINK, _GET, body)


def dump_links(master: int = 0) -> Request:
    """Every link, or (strict socket) those enslaved to `master`."""
    body = IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + _SKIP_STATS
    body += nl.attr_u32(IFLA_MASTER, master) if master else b""
    return Request("link dump" + (f" of master ifindex {master}" if master else ""), RTM_GETLINK, _DUMP, body)


def set_link_up(index: int) -> Request:
    """`ip link set <dev> up`."""
    return Request(f"link set ifindex {index} up", RTM_NEWLINK, _ACK, IFINFOMSG.pack(socket.AF_UNSPEC, 0, index,
                                                                                       IFF_UP, IFF_UP))


def parse_link(msg: Message) -> Link:
    _family, _type, index, flags, _change = nl.unpack_header(IFINFOMSG, msg.payload, "ifinfomsg")
    attrs = nl.parse_attrs(msg.payload, IFINFOMSG.size, where="link")
    info = nl.parse_attrs(attrs.get(IFLA_LINKINFO, b""), where="IFLA_LINKINFO")
    nsid = attrs.get(IFLA_LINK_NETNSID)
    return Link(
        index=index,
        name=nl.get_str(attrs, IFLA_IFNAME) or "",
        kind=nl.get_str(info, IFLA_INFO_KIND),
        master=nl.get_u32(attrs, IFLA_MASTER),
        peer=nl.get_s32(attrs, IFLA_LINK),
        peer_nsid=nl.get_s32(attrs, IFLA_LINK_NETNSID) if nsid is not None else None,
        address=attrs.get(IFLA_ADDRESS, b""),
        flags=flags,
    )


# -- addresses -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Address:
    family: int
    index: int
    address: str  # the interface's own address: IFA_LOCAL (IPv4; IFA_ADDRESS is the far end's on point-to-point
    # links), else IFA_ADDRESS (IPv6 gives that alone)


def dump_addrs(family: int = socket.AF_UNSPEC, index: int = 0, nsid: int | None = None) -> Request:
    """Addresses (strict socket: of `family` on `index`; `nsid`: in ANOTHER namespace, by its id here:
    IFA_TARGET_NETNSID, Linux >= 4.20)."""
    body = IFADDRMSG.pack(family, 0, 0, 0, index)
    if nsid is not None:
        body += nl.attr_s32(IFA_TARGET_NETNSID, nsid)
    where = (f" of ifindex {index}" if index else "") + (f" in netns id {nsid}" if nsid is not None else "")
    return Request("address dump" + where, RTM_GETADDR, _DUMP, body)


def parse_addr(msg: Message) -> Address | None:
    family, _plen, _flags, _scope, index = nl.unpack_header(IFADDRMSG, msg.payload, "ifaddrmsg")
    attrs = nl.parse_attrs(msg.payload, IFADDRMSG.size, where="address")
    if family not in _ADDR_LEN:
        return None
    ip = _ip(family, attrs.get(IFA_LOCAL, attrs.get(IFA_ADDRESS)))
    return Address(family, index, ip) if ip is not None else None


# -- routes ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Route:
    family: int
    table: int
    type: int
    dst_len: int
    oifs: tuple[int, ...]  # RTA_OIF, or every next hop's of a multipath route
    gateway: str | None  # RTA_GATEWAY, or any next hop's


def _table(table: int) -> tuple[int, bytes]:
    """As ip does: the header's table for ids below 256, else RT_TABLE_UNSPEC there and RTA_TABLE."""
    return (table, b"") if table < 256 else (RT_TABLE_UNSPEC, nl.attr_u32(RTA_TABLE, table))


def get_route(dst: str) -> Request:
    """`ip route get <dst>`: the route the node would use to reach `dst`."""
    family = family_of(dst)
    flags = RTM_F_LOOKUP_TABLE if family == socket.AF_INET else 0  # as ip: IPv6 refuses the flag (EINVAL)
    header = RTMSG.pack(family, _ADDR_LEN[family] * 8, 0, 0, 0, 0, 0, 0, flags)
    return Request(f"route get {dst}", RTM_GETROUTE, _GET, header + nl.attr(RTA_DST, socket.inet_pton(family, dst)))


def dump_routes(family: int, table: int) -> Request:
    """The routes of `table` (strict socket: the kernel filters; ENOENT when the table does not exist)."""
    body = RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0) + nl.attr_u32(RTA_TABLE, table)
    return Request(f"route dump of table {table} ({_family_name(family)})", RTM_GETROUTE, _DUMP, body)


def local_route(add: bool, family: int, table: int, oif: int) -> Request:
    """`ip [-6] route add|del local 0.0.0.0/0 (::/0) dev <oif> table <table>`."""
    table_id, table_attr = _table(table)
    protocol = RTPROT_BOOT if add else 0
    scope = RT_SCOPE_HOST if family == socket.AF_INET else RT_SCOPE_UNIVERSE
    header = RTMSG.pack(family, 0, 0, 0, table_id, protocol, scope, RTN_LOCAL, 0)
    body = header + table_attr + nl.attr(RTA_DST, b"\0" * _ADDR_LEN[family]) + nl.attr_u32(RTA_OIF, oif)
    what = f"route {'add' if add else 'del'} local {_any(family)} dev ifindex {oif} table {table}"
    return Request(what, RTM_NEWROUTE if add else RTM_DELROUTE, _CREATE if add else _ACK, body)


def parse_route(msg: Message) -> Route:
    family, dst_len, _src, _tos, table, _proto, _scope, rtype, _flags = nl.unpack_header(RTMSG, msg.payload, "rtmsg")
    attrs = nl.parse_attrs(msg.payload, RTMSG.size, where="route")
    oifs = [nl.get_u32(attrs, RTA_OIF)] if RTA_OIF in attrs else []
    gateway = _ip(family, attrs.get(RTA_GATEWAY)) if family in _ADDR_LEN else None
    hops = attrs.get(RTA_MULTIPATH, b"")
    off = 0
    while off + RTNEXTHOP.size <= len(hops):
        length, _flags, _hops, ifindex = RTNEXTHOP.unpack_from(hops, off)
        if length < RTNEXTHOP.size or off + length > len(hops):
            raise nl.malformed(f"next hop of length {length} at offset {off} of RTA_MULTIPATH")
        oifs.append(ifindex)
        hop_gw = nl.parse_attrs(hops[off + RTNEXTHOP.size : off + length], where="next hop").get(RTA_GATEWAY)
        if gateway is None and family in _ADDR_LEN:
            gateway = _ip(family, hop_gw)
        off += nl.align4(length)
    return Route(family, nl.get_u32(attrs, RTA_TABLE, table), rtype, dst_len, tuple(oifs), gateway)


# -- rules -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """A policy-routing rule as the capture makes them: `fwmark/fwmask [iif] lookup <table>|goto <priority>`."""

    family: int
    priority: int
    fwmark: int = 0
    fwmask: int = 0
    table: int = 0  # FR_ACT_TO_TBL when set
    goto: int = 0  # FR_ACT_GOTO when set
    iifname: str | None = None

    def __str__(self) -> str:
        action = f"goto {self.goto}" if self.goto else f"lookup {self.table}"
        iif = f" iif {self.iifname}" if self.iifname else ""
        return f"{self.priority}: fwmark {self.fwmark:#x}/{self.fwmask:#x}{iif} {action} ({_family_name(self.family)})"


def dump_rules(family: int) -> Request:
    return Request(f"rule dump ({_family_name(family)})", RTM_GETRULE, _DUMP,
                   FIB_RULE_HDR.pack(family, 0, 0, 0, 0, 0, 0, 0, 0))


def change_rule(add: bool, rule: Rule) -> Request:
    """`ip [-6] rule add|del fwmark M/K [iif I] lookup T|goto P priority N`, attributes in ip's order."""
    table_id, action = RT_TABLE_UNSPEC, FR_ACT_GOTO if rule.goto else FR_ACT_TO_TBL if add else FR_ACT_UNSPEC
    attrs = b""
    if not rule.goto:
        table_id = rule.table if rule.table < 256 else RT_TABLE_UNSPEC
    if rule.fwmark:
        attrs += nl.attr_u32(FRA_FWMARK, rule.fwmark) + nl.attr_u32(FRA_FWMASK, rule.fwmask)
    if rule.iifname:
        attrs += nl.attr_str(FRA_IIFNAME, rule.iifname)
    if rule.goto:
        attrs += nl.attr_u32(FRA_GOTO, rule.goto)
    elif rule.table >= 256:
        attrs += nl.attr_u32(FRA_TABLE, rule.table)
    attrs += nl.attr_u32(FRA_PRIORITY, rule.priority)
    header = FIB_RULE_HDR.pack(rule.family, 0, 0, 0, table_id, 0, 0, action, 0)
    return Request(f"rule {'add' if add else 'del'} {rule}", RTM_NEWRULE if add else RTM_DELRULE,
                   _CREATE if add else _ACK, header + attrs)


def parse_rule(msg: Message) -> Rule:
    family, _d, _s, _tos, table, _r1, _r2, action, _flags = nl.unpack_header(FIB_RULE_HDR, msg.payload, "fib_rule_hdr")
    attrs = nl.parse_attrs(msg.payload, FIB_RULE_HDR.size, where="rule")
    return Rule(
        family=family,
        priority=nl.get_u32(attrs, FRA_PRIORITY),
        fwmark=nl.get_u32(attrs, FRA_FWMARK),
        fwmask=nl.get_u32(attrs, FRA_FWMASK),
        table=nl.get_u32(attrs, FRA_TABLE, table) if action == FR_ACT_TO_TBL else 0,
        goto=nl.get_u32(attrs, FRA_GOTO) if action == FR_ACT_GOTO else 0,
        iifname=nl.get_str(attrs, FRA_IIFNAME),
    )


# -- neighbours (the bridge-port lookup's hint) -----------------------------------------------------------------
def get_neighbour(ip: str, ifindex: int) -> Request:
    family = family_of(ip)
    body = NDMSG.pack(family, ifindex, 0, 0, 0) + nl.attr(NDA_DST, socket.inet_pton(family, ip))
    return Request(f"neighbour get {ip} on ifindex {ifindex}", RTM_GETNEIGH, _GET, body)


def get_fdb(mac: bytes, bridge: int) -> Request:
    body = NDMSG.pack(AF_BRIDGE, 0, 0, 0, 0) + nl.attr(NDA_LLADDR, mac) + nl.attr_u32(NDA_MASTER, bridge)
    return Request(f"fdb get {mac.hex(':')} on bridge ifindex {bridge}", RTM_GETNEIGH, _GET, body)


def parse_neighbour(msg: Message) -> tuple[int, int, bytes | None]:
    """(ifindex, state, link-layer address)."""
    _family, ifindex, state, _flags, _type = nl.unpack_header(NDMSG, msg.payload, "ndmsg")
    return ifindex, state, nl.parse_attrs(msg.payload, NDMSG.size, where="neighbour").get(NDA_LLADDR)


# -- tc: the clsact qdisc and bpf filters ------------------------------------------------------------------------
@dataclass(frozen=True)
class Filter:
    ifindex: int
    parent: int
    handle: int
    prio: int
    kind: str | None
    bpf_name: str | None  # TCA_BPF_NAME of a bpf filter


def _info(prio: int, protocol: int) -> int:
    return (prio << 16) | socket.htons(protocol)


def clsact(add: bool, ifindex: int) -> Request:
    """`tc qdisc add|del dev <ifindex> clsact`."""
    body = TCMSG.pack(socket.AF_UNSPEC, ifindex, CLSACT_HANDLE, TC_H_CLSACT, 0) + nl.attr_str(TCA_KIND, "clsact")
    return Request(f"tc qdisc {'add' if add else 'del'} clsact on ifindex {ifindex}",
                   RTM_NEWQDISC if add else RTM_DELQDISC, _CREATE if add else _ACK, body)


def bpf_filter(ifindex: int, parent: int, prio: int, handle: int, prog_fd: int, name: str, *,
               replace: bool = True, protocol: int = ETH_P_ALL, classid: int = 1) -> Request:
    """`tc filter replace|add dev <ifindex> parent <parent> protocol all prio P handle H bpf da fd F name N`.
    replace: install or atomically swap the program at (prio, handle); else EEXIST when there is one."""
    options = (nl.attr_u32(TCA_BPF_CLASSID, classid) + nl.attr_u32(TCA_BPF_FD, prog_fd)
               + nl.attr_str(TCA_BPF_NAME, name) + nl.attr_u32(TCA_BPF_FLAGS, TCA_BPF_FLAG_ACT_DIRECT))
    body = (TCMSG.pack(socket.AF_UNSPEC, ifindex, handle, parent, _info(prio, protocol))
            + nl.attr_str(TCA_KIND, "bpf") + nl.attr(TCA_OPTIONS | nl.NLA_F_NESTED, options))
    what = f"tc filter {'replace' if replace else 'add'} bpf {name} prio {prio} handle {handle:#x} on ifindex {ifindex}"
    return Request(what, RTM_NEWTFILTER, _REPLACE if replace else _CREATE, body)


def del_filter(ifindex: int, parent: int, prio: int, handle: int, protocol: int = ETH_P_ALL) -> Request:
    """`tc filter del dev <ifindex> parent <parent> protocol all prio P handle H bpf`."""
    body = TCMSG.pack(socket.AF_UNSPEC, ifindex, handle, parent, _info(prio, protocol)) + nl.attr_str(TCA_KIND, "bpf")
    return Request(f"tc filter del prio {prio} handle {handle:#x} on ifindex {ifindex}", RTM_DELTFILTER, _ACK, body)


def dump_filters(ifindex: int, parent: int) -> Request:
    """`tc filter show dev <ifindex> parent <parent>`."""
    return Request(f"tc filter dump of parent {parent:#x} on ifindex {ifindex}", RTM_GETTFILTER, _DUMP,
                   TCMSG.pack(socket.AF_UNSPEC, ifindex, 0, parent, 0))


def parse_filter(msg: Message) -> Filter:
    _family, ifindex, handle, parent, info = nl.unpack_header(TCMSG, msg.payload, "tcmsg")
    attrs = nl.parse_attrs(msg.payload, TCMSG.size, where="tc filter")
    kind = nl.get_str(attrs, TCA_KIND)
    name = None
    if kind == "bpf" and TCA_OPTIONS in attrs:
        name = nl.get_str(nl.parse_attrs(attrs[TCA_OPTIONS], where="TCA_OPTIONS"), TCA_BPF_NAME)
    return Filter(ifindex, parent, handle, (info >> 16) & 0xFFFF, kind, name)


def _family_name(family: int) -> str:
    names: dict[int, str] = {socket.AF_INET: "IPv4", socket.AF_INET6: "IPv6"}
    return names.get(family, f"family {family}")


def _any(family: int) -> str:
    return "::/0" if family == socket.AF_INET6 else "0.0.0.0/0"


# -- I/O -------------------------------------------------------------------------------------------------------
class Rtnl(nl.NetlinkClient):
    """The requests above on one strict-checking NETLINK_ROUTE socket, in the namespace of the thread that
    creates it. Not thread-safe. A failure is an OSError naming the request and, for tc, the interface."""

    def __init__(self, timeout: float = 5.0) -> None:
        self.sock = nl.NetlinkSocket(socket.NETLINK_ROUTE, timeout=timeout, strict=True)

    # links
    def link(self, index: int = 0, name: str | None = None) -> Link:
        """OSError ENODEV (naming the link) when there is none."""
        return self.sock.request(get_link(index, name), parse_link)[0]

    def links(self, master: int = 0) -> list[Link]:
        return self.sock.request(dump_links(master), parse_link)

    def ifindex(self, name: str) -> int | None:
        """The index of interface `name`; None when there is none."""
        try:
            return self.link(name=name).index
        except OSError as e:
            if e.errno == errno.ENODEV:
                return None
            raise

    def set_up(self, index: int) -> None:
        self.sock.request(set_link_up(index), _ignore)

    def describe(self, index: int) -> str:
        """'ifindex 7 (veth1)', for error messages (never fails)."""
        try:
            return f"ifindex {index} ({self.link(index).name})"
        except OSError:
            return f"ifindex {index} (gone)"

    # addresses
    def addresses(self, family: int = socket.AF_UNSPEC, index: int = 0, nsid: int | None = None) -> list[Address]:
        found = self.sock.request(dump_addrs(family, index, nsid), parse_addr)
        return [a for a in found if a is not None and (not index or a.index == index)]

    # routes
    def route_to(self, dst: str) -> Route:
        return self.sock.request(get_route(dst), parse_route)[0]

    def routes(self, family: int, table: int) -> list[Route]:
        """The routes of `table` ([] when the table does not exist)."""
        try:
            found = self.sock.request(dump_routes(family, table), parse_route)
        except OSError as e:
            if e.errno == errno.ENOENT:
                return []
            raise
        return [r for r in found if r.family == family]  # a family the kernel lacks is answered by all the others

    def default_routes(self, family: int) -> list[Route]:
        return [r for r in self.routes(family, RT_TABLE_MAIN) if r.dst_len == 0 and r.type == RTN_UNICAST]

    def local_route(self, add: bool, family: int, table: int, oif: int) -> None:
        self.sock.request(local_route(add, family, table, oif), _ignore)

    # rules
    def rules(self, family: int) -> list[Rule]:
        return self.sock.request(dump_rules(family), parse_rule)

    def rule(self, add: bool, rule: Rule) -> None:
        self.sock.request(change_rule(add, rule), _ignore)

    # neighbours
    def neighbour(self, ip: str, ifindex: int) -> tuple[int, int, bytes | None] | None:
        return self._get_or_none(get_neighbour(ip, ifindex))

    def fdb(self, mac: bytes, bridge: int) -> tuple[int, int, bytes | None] | None:
        return self._get_or_none(get_fdb(mac, bridge))

    def _get_or_none(self, request: Request) -> tuple[int, int, bytes | None] | None:
        try:
            found = self.sock.request(request, parse_neighbour)
        except OSError as e:
            if e.errno == errno.ENOENT:
                return None
            raise
        return found[0] if found else None

    # tc
    def clsact(self, add: bool, ifindex: int) -> None:
        self._tc(clsact(add, ifindex), ifindex)

    def bpf_filter(self, ifindex: int, parent: int, prio: int, handle: int, prog_fd: int, name: str, *,
                   replace: bool = True) -> None:
        self._tc(bpf_filter(ifindex, parent, prio, handle, prog_fd, name, replace=replace), ifindex)

    def del_filter(self, ifindex: int, parent: int, prio: int, handle: int) -> None:
        self._tc(del_filter(ifindex, parent, prio, handle), ifindex)

    def filters(self, ifindex: int, parent: int) -> list[Filter]:
        return [f for f in self.sock.request(dump_filters(ifindex, parent), parse_filter) if f.kind is not None]

    def _tc(self, request: Request, ifindex: int) -> None:
        try:
            self.sock.request(request, _ignore)
        except OSError as e:
            on = f"on ifindex {ifindex}"
            raise OSError(e.errno, (e.strerror or "").replace(on, "on " + self.describe(ifindex), 1)) from e


def _ignore(msg: Message) -> None:
    return None
