"""The original destination of a NATed connection, from the kernel's connection tracking (ctnetlink).

When a pod calls a Service VIP, kube-proxy's DNAT in the node's namespace rewrites the destination to an endpoint
before the pod's door captures the connection; the agent then accepts it seeing only the endpoint's address. The
node's conntrack entry still holds the connection as the client opened it. Looking the entry up by its REPLY
tuple (what the accepted socket sees: from the endpoint's address:port back to the client's) gives the ORIGINAL
tuple, whose destination is the VIP:port (``conntrack -G --reply-src <local> --reply-dst <peer> ...``).

`Conntrack.original_destination()` does that with one IPCTNL_MSG_CT_GET on a NETLINK_NETFILTER socket: pure
builders and parsers below, the socket from `netlink`. It needs CAP_NET_ADMIN in the namespace whose conntrack
table holds the entry (the node's: create the `Conntrack` there).
"""

from __future__ import annotations

import errno
import socket
import struct
from dataclasses import dataclass

from agent.capture import netlink as nl
from agent.capture.netlink import Message, Request

NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW, IPCTNL_MSG_CT_GET = 0, 1
NFNETLINK_V0 = 0
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY = 1, 2
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
NFGENMSG = struct.Struct("=BBH")  # family, version, res_id (big-endian; 0)
_IP_ATTRS: dict[int, tuple[int, int]] = {
    socket.AF_INET: (CTA_IP_V4_SRC, CTA_IP_V4_DST),
    socket.AF_INET6: (CTA_IP_V6_SRC, CTA_IP_V6_DST),
}

Endpoint = tuple[str, int]  # (address, port)


@dataclass(frozen=True)
class Tuple:
    """One direction of a tracked connection."""

    protocol: int
    src: Endpoint
    dst: Endpoint


@dataclass(frozen=True)
class Entry:
    original: Tuple  # as the client sent it: to the VIP
    reply: Tuple  # as the answer goes: from the endpoint after DNAT


_V4_MAPPED = b"\0" * 10 + b"\xff\xff"


def _packed(ip: str) -> tuple[int, bytes]:
    """(family, packed address) of `ip`; an IPv4-mapped IPv6 address (a dual-stack socket's view of an IPv4 peer)
    is IPv4. ValueError names a bad address."""
    try:
        if ":" not in ip:
            return socket.AF_INET, socket.inet_pton(socket.AF_INET, ip)
        raw = socket.inet_pton(socket.AF_INET6, ip.split("%", 1)[0])
    except OSError:
        raise ValueError(f"conntrack lookup: {ip!r} is not an IP address") from None
    return (socket.AF_INET, raw[12:]) if raw[:12] == _V4_MAPPED else (socket.AF_INET6, raw)


def _tuple_attr(kind: int, family: int, protocol: int, src: tuple[bytes, int], dst: tuple[bytes, int]) -> bytes:
    """A CTA_TUPLE_* attribute: addresses packed, ports in host order."""
    src_kind, dst_kind = _IP_ATTRS[family]
    ips = [nl.attr(src_kind, src[0]), nl.attr(dst_kind, dst[0])]
    proto = [nl.attr_u8(CTA_PROTO_NUM, protocol), nl.attr_be16(CTA_PROTO_SRC_PORT, src[1]),
             nl.attr_be16(CTA_PROTO_DST_PORT, dst[1])]
    return nl.nested(kind, [nl.nested(CTA_TUPLE_IP, ips), nl.nested(CTA_TUPLE_PROTO, proto)])


def get_by_reply(local: Endpoint, peer: Endpoint, protocol: int = socket.IPPROTO_TCP) -> Request:
    """IPCTNL_MSG_CT_GET of the entry whose reply tuple is `local` -> `peer` (the accepted socket's own address and
    its peer's). Both in one family (IPv4-mapped addresses count as IPv4); ValueError otherwise."""
    family, local_ip = _packed(local[0])
    peer_family, peer_ip = _packed(peer[0])
    if family != peer_family:
        raise ValueError(f"conntrack lookup: {local[0]} and {peer[0]} are not of one address family")
    for port in (local[1], peer[1]):
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"conntrack lookup: port {port} out of range")
    body = NFGENMSG.pack(family, NFNETLINK_V0, 0) + _tuple_attr(CTA_TUPLE_REPLY, family, protocol,
                                                                (local_ip, local[1]), (peer_ip, peer[1]))
    what = f"conntrack get by reply {_show(local)} -> {_show(peer)}"
    return Request(what, (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET, nl.NLM_F_REQUEST, body)


def _parse_tuple(raw: bytes, family: int, where: str) -> Tuple:
    attrs = nl.parse_attrs(raw, where=where)
    ips = nl.parse_attrs(attrs.get(CTA_TUPLE_IP, b""), where=f"{where} addresses")
    proto = nl.parse_attrs(attrs.get(CTA_TUPLE_PROTO, b""), where=f"{where} protocol")
    src_kind, dst_kind = _IP_ATTRS[family]
    size = 4 if family == socket.AF_INET else 16
    addrs = []
    for kind in (src_kind, dst_kind):
        raw_ip = ips.get(kind)
        if raw_ip is None or len(raw_ip) != size:
            raise nl.malformed(f"{where}: no {size}-byte address {kind}")
        addrs.append(socket.inet_ntop(family, raw_ip))
    if CTA_PROTO_NUM not in proto:
        raise nl.malformed(f"{where}: no protocol number")
    return Tuple(nl.get_u8(proto, CTA_PROTO_NUM), (addrs[0], nl.get_be16(proto, CTA_PROTO_SRC_PORT)),
                 (addrs[1], nl.get_be16(proto, CTA_PROTO_DST_PORT)))


def parse_entry(msg: Message) -> Entry:
    """An IPCTNL_MSG_CT_NEW answer: both tuples. OSError EPROTO when one is missing or malformed."""
    if msg.type != (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW:
        raise nl.malformed(f"conntrack answer of type {msg.type:#x}")
    family, _version, _res = nl.unpack_header(NFGENMSG, msg.payload, "nfgenmsg")
    if family not in _IP_ATTRS:
        raise nl.malformed(f"conntrack entry of family {family}")
    attrs = nl.parse_attrs(msg.payload, NFGENMSG.size, where="conntrack entry")
    tuples = []
    for kind, name in ((CTA_TUPLE_ORIG, "original tuple"), (CTA_TUPLE_REPLY, "reply tuple")):
        if kind not in attrs:
            raise nl.malformed(f"conntrack entry without its {name}")
        tuples.append(_parse_tuple(attrs[kind], family, name))
    return Entry(tuples[0], tuples[1])


def translated_destination(entry: Entry) -> Endpoint | None:
    """The destination the client asked for when the node rewrote it (DNAT: the original tuple's destination is
    not where the reply comes from), else None."""
    if entry.original.dst == entry.reply.src:
        return None
    return entry.original.dst


def _show(ep: Endpoint) -> str:
    return f"[{ep[0]}]:{ep[1]}" if ":" in ep[0] else f"{ep[0]}:{ep[1]}"


class Conntrack(nl.NetlinkClient):
    """Lookups in the conntrack table of the namespace the creating thread is in (the node's: where kube-proxy
    NATs). Blocking, one netlink round trip per lookup, bounded by `timeout`; not thread-safe."""

    def __init__(self, timeout: float = 1.0) -> None:
        self.sock = nl.NetlinkSocket(NETLINK_NETFILTER, timeout=timeout)

    def entry_by_reply(self, local: Endpoint, peer: Endpoint) -> Entry | None:
        """The TCP entry whose reply tuple is `local` -> `peer`; None when there is none."""
        try:
            found = self.sock.request(get_by_reply(local, peer), parse_entry)
        except OSError as e:
            if e.errno == errno.ENOENT:
                return None
            raise
        return found[0] if found else None

    def original_destination(self, local: Endpoint, peer: Endpoint) -> Endpoint | None:
        """For a connection accepted with address `local` (``sock.getsockname()[:2]``) from `peer`
        (``getpeername()[:2]``): the (address, port) the client originally connected to when this namespace
        rewrote it (a Service VIP DNATed to this endpoint), else None (no entry: not tracked here, or NATed on
        another node; or tracked without DNAT). IPv4-mapped addresses are taken as IPv4; the answer is in the
        entry's family. OSError names the lookup when the kernel refuses it (EPERM without CAP_NET_ADMIN)."""
        entry = self.entry_by_reply(local, peer)
        return translated_destination(entry) if entry is not None else None
