"""rtnetlink requests, byte for byte against what `ip` and `tc` send for the same command (captured with strace on
Linux 6.18, iproute2 6.1; the sequence number set to theirs), and answers the kernel gave, parsed."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from agent.capture import netlink as nl
from agent.capture import rtnl
from agent.capture.netlink import Request
from agent.capture.rtnl import Rule

FIXTURES = Path(__file__).parents[2] / "fixtures" / "netlink"
INGRESS, EGRESS = 0xFFFFFFF2, 0xFFFFFFF3

# (what we build, the command, the bytes it sent: header with its seq and pid 0, then the body)
SENT_BY_IP_AND_TC: list[tuple[Request, str, str]] = [
    (rtnl.set_link_up(1), "ip link set lo up",
     "20000000 1000 0500 51c0146b 00000000 00000000 01000000 01000000 01000000"),
    (rtnl.local_route(True, socket.AF_INET, 100, 1), "ip route add local 0.0.0.0/0 dev lo table 100",
     "2c000000 1800 0506 52c0146b 00000000 02000000 6403fe02 00000000 08000100 00000000 08000400 01000000"),
    (rtnl.local_route(True, socket.AF_INET6, 100, 1), "ip -6 route add local ::/0 dev lo table 100",
     "38000000 1800 0506 52c0146b 00000000 0a000000 64030002 00000000 14000100" + "00" * 16 + "08000400 01000000"),
    (rtnl.local_route(False, socket.AF_INET, 100, 1), "ip route del local 0.0.0.0/0 dev lo table 100",
     "2c000000 1900 0500 52c0146b 00000000 02000000 6400fe02 00000000 08000100 00000000 08000400 01000000"),
    (rtnl.local_route(False, socket.AF_INET6, 100, 1), "ip -6 route del local ::/0 dev lo table 100",
     "38000000 1900 0500 53c0146b 00000000 0a000000 64000002 00000000 14000100" + "00" * 16 + "08000400 01000000"),
    (rtnl.change_rule(True, Rule(socket.AF_INET, 100, 0x539, 0xFFFFFFFF, table=100)),
     "ip rule add fwmark 0x539/0xffffffff lookup 100 priority 100",
     "34000000 2000 0506 53c0146b 00000000 02000000 64000001 00000000 08000a00 39050000 08001000 ffffffff "
     "08000600 64000000"),
    (rtnl.change_rule(True, Rule(socket.AF_INET, 99, 0x539, 0xFFFFFFFF, iifname="lo", goto=32766)),
     "ip rule add fwmark 0x539/0xffffffff iif lo goto 32766 priority 99",
     "44000000 2000 0506 53c0146b 00000000 02000000 00000002 00000000 08000a00 39050000 08001000 ffffffff "
     "07000300 6c6f0000 08000400 fe7f0000 08000600 63000000"),
    (rtnl.change_rule(True, Rule(socket.AF_INET6, 100, 0x539, 0xFFFFFFFF, table=100)),
     "ip -6 rule add fwmark 0x539/0xffffffff lookup 100 priority 100",
     "34000000 2000 0506 53c0146b 00000000 0a000000 64000001 00000000 08000a00 39050000 08001000 ffffffff "
     "08000600 64000000"),
    (rtnl.change_rule(False, Rule(socket.AF_INET, 100, 0x539, 0xFFFFFFFF, table=100)),
     "ip rule del fwmark 0x539/0xffffffff lookup 100 priority 100",
     "34000000 2100 0500 54c0146b 00000000 02000000 64000000 00000000 08000a00 39050000 08001000 ffffffff "
     "08000600 64000000"),
    (rtnl.change_rule(False, Rule(socket.AF_INET, 99, 0x539, 0xFFFFFFFF, iifname="lo", goto=32766)),
     "ip rule del fwmark 0x539/0xffffffff iif lo goto 32766 priority 99",
     "44000000 2100 0500 54c0146b 00000000 02000000 00000002 00000000 08000a00 39050000 08001000 ffffffff "
     "07000300 6c6f0000 08000400 fe7f0000 08000600 63000000"),
    (rtnl.get_route("127.0.0.5"), "ip route get 127.0.0.5",
     "24000000 1a00 0100 61c0146b 00000000 02200000 00000000 00100000 08000100 7f000005"),
    (rtnl.get_route("::1"), "ip -6 route get ::1",
     "30000000 1a00 0100 61c0146b 00000000 0a800000 00000000 00000000 14000100" + "00" * 15 + "01"),
    (rtnl.clsact(True, 3), "tc qdisc add dev d0 clsact",
     "30000000 2400 0506 63c0146b 00000000 00000000 03000000 0000ffff f1ffffff 00000000 0b000100 636c7361 63740000"),
    (rtnl.clsact(False, 3), "tc qdisc del dev d0 clsact",
     "30000000 2500 0500 65c0146b 00000000 00000000 03000000 0000ffff f1ffffff 00000000 0b000100 636c7361 63740000"),
    (rtnl.del_filter(3, INGRESS, 1, 0x539), "tc filter del dev d0 ingress protocol all prio 1 handle 0x539 bpf",
     "2c000000 2d00 0500 64c0146b 00000000 00000000 03000000 39050000 f2ffffff 00030100 08000100 62706600"),
    (rtnl.del_filter(3, EGRESS, 1, 0x539), "tc filter del dev d0 egress protocol all prio 1 handle 0x539 bpf",
     "2c000000 2d00 0500 64c0146b 00000000 00000000 03000000 39050000 f3ffffff 00030100 08000100 62706600"),
    (rtnl.dump_rules(socket.AF_INET), "ip rule show",
     "1c000000 2200 0103 66c0146b 00000000 02000000 00000000 00000000"),
]


@pytest.mark.parametrize(("request_", "command", "sent"), SENT_BY_IP_AND_TC, ids=[c for _r, c, _s in SENT_BY_IP_AND_TC])
def test_requests_are_what_ip_and_tc_send(request_: Request, command: str, sent: str) -> None:
    expected = bytes.fromhex(sent.replace(" ", ""))
    seq = int.from_bytes(expected[8:12], "little")
    assert nl.encode(request_, seq).hex() == expected.hex()


def test_a_route_dump_of_a_table_is_filtered_by_the_kernel() -> None:
    """`ip -6 route show table 100` on a strict socket: rtmsg of the family and RTA_TABLE."""
    sent = "24000000 1a00 0103 65c0146b 00000000 0a000000 00000000 00000000 08000f00 64000000"
    assert nl.encode(rtnl.dump_routes(socket.AF_INET6, 100), 0x6B14C065).hex() == sent.replace(" ", "")


def test_the_bpf_filter_request_layout() -> None:
    """`tc filter replace dev <3> ingress protocol all prio 1 handle 0x539 bpf da fd 9 name ambit_x` (tc takes no
    fd on its command line, so the layout is spelt out: tcmsg, TCA_KIND, TCA_OPTIONS nested)."""
    body = rtnl.bpf_filter(3, INGRESS, 1, 0x539, 9, "ambit_x").body
    assert body.hex() == (
        "00000000 03000000 39050000 f2ffffff 00030100"  # tcmsg: ifindex 3, handle, parent, prio 1 | htons(ETH_P_ALL)
        " 08000100 62706600"  # TCA_KIND "bpf"
        " 28000280"  # TCA_OPTIONS, nested, 40 bytes
        " 08000300 01000000"  # TCA_BPF_CLASSID 1
        " 08000600 09000000"  # TCA_BPF_FD 9
        " 0c000700 616d6269 745f7800"  # TCA_BPF_NAME "ambit_x"
        " 08000800 01000000"  # TCA_BPF_FLAGS: direct action
    ).replace(" ", "")
    assert rtnl.bpf_filter(3, INGRESS, 1, 0x539, 9, "x").flags == nl.NLM_F_REQUEST | nl.NLM_F_ACK | 0x500  # replace
    assert rtnl.bpf_filter(3, INGRESS, 1, 0x539, 9, "x", replace=False).flags == 0x605  # add: create, exclusive


def _answers(hexed: str) -> list[nl.Message]:
    return nl.split_messages(bytes.fromhex(hexed.replace(" ", "")))


def test_parse_the_kernels_route_get_answer() -> None:
    """`ip route get 10.77.5.3` with `10.77.5.0/24 via 10.77.0.9 dev n0 onlink`."""
    answer = ("70000000 1800 0000 98c1146b be6b0000 02200000 fe000001 00020000 08000f00 fe000000 08000100 0a4d0503 "
              "08000400 02000000 08000700 0a4d0001 08000500 0a4d0009 08001900 00000000 24000c00" + "00" * 32)
    (route,) = [rtnl.parse_route(m) for m in _answers(answer)]
    assert route == rtnl.Route(socket.AF_INET, 254, rtnl.RTN_UNICAST, 32, (2,), "10.77.0.9")


def test_parse_a_multipath_route() -> None:
    hop = rtnl.RTNEXTHOP.pack(16, 0, 0, 4) + nl.attr(rtnl.RTA_GATEWAY, socket.inet_aton("10.0.0.1"))
    hop2 = rtnl.RTNEXTHOP.pack(8, 0, 0, 5)
    payload = rtnl.RTMSG.pack(socket.AF_INET, 0, 0, 0, 254, 3, 0, 1, 0) + nl.attr(rtnl.RTA_MULTIPATH, hop + hop2)
    route = rtnl.parse_route(nl.Message(24, 0, 1, payload))
    assert route.oifs == (4, 5) and route.gateway == "10.0.0.1" and route.dst_len == 0
    bad = rtnl.RTMSG.pack(socket.AF_INET, 0, 0, 0, 254, 3, 0, 1, 0) + nl.attr(rtnl.RTA_MULTIPATH, rtnl.RTNEXTHOP.pack(
        64, 0, 0, 4))
    with pytest.raises(OSError, match="next hop of length 64"):
        rtnl.parse_route(nl.Message(24, 0, 1, bad))


def test_parse_the_kernels_rule_dump() -> None:
    """`ip rule show` after `ip rule add fwmark 0x539/0xffffffff lookup 100 priority 100` and the goto rule."""
    dump = (
        "34000000 2000 0200 99c1146b 526c0000 02000000 ff000001 00000000 08000f00 ff000000 08000e00 ffffffff "
        "05001500 02000000"
        " 5c000000 2000 0200 99c1146b 526c0000 02000000 00000002 00000000 08000f00 00000000 08000e00 ffffffff "
        "05001500 00000000 07000300 6c6f0000 08000600 63000000 08000a00 39050000 08001000 ffffffff 08000400 fe7f0000"
        " 4c000000 2000 0200 99c1146b 526c0000 02000000 64000001 00000000 08000f00 64000000 08000e00 ffffffff "
        "05001500 00000000 08000600 64000000 08000a00 39050000 08001000 ffffffff"
        " 14000000 0300 0200 99c1146b 526c0000 00000000"
    )
    rules = [rtnl.parse_rule(m) for m in _answers(dump) if m.type == rtnl.RTM_NEWRULE]
    assert rules == [
        Rule(socket.AF_INET, 0, table=255),  # 0: from all lookup local
        Rule(socket.AF_INET, 99, 0x539, 0xFFFFFFFF, iifname="lo", goto=32766),
        Rule(socket.AF_INET, 100, 0x539, 0xFFFFFFFF, table=100),
    ]


def test_parse_the_kernels_link_answer_of_a_veth_whose_peer_is_in_another_namespace() -> None:
    """`ip -d link show n0`: a veth with its peer (ifindex 2) in the namespace of id 0 here."""
    (msg,) = nl.split_messages(bytes.fromhex((FIXTURES / "link_veth_n0.hex").read_text().strip()))
    link = rtnl.parse_link(msg)
    assert (link.index, link.name, link.kind, link.master, link.peer, link.peer_nsid) == (2, "n0", "veth", 0, 2, 0)
    assert link.address.hex() == "decf39cb5b3c" and link.flags & rtnl.IFF_UP


def test_parse_addresses_takes_the_local_address_of_ipv4() -> None:
    """A point-to-point IPv4 address: IFA_LOCAL is ours, IFA_ADDRESS the far end's."""
    payload = (rtnl.IFADDRMSG.pack(socket.AF_INET, 32, 0, 0, 4)
               + nl.attr(rtnl.IFA_ADDRESS, socket.inet_aton("10.0.0.2"))
               + nl.attr(rtnl.IFA_LOCAL, socket.inet_aton("10.0.0.1")))
    assert rtnl.parse_addr(nl.Message(20, 0, 1, payload)) == rtnl.Address(socket.AF_INET, 4, "10.0.0.1")
    v6 = rtnl.IFADDRMSG.pack(socket.AF_INET6, 64, 0, 0, 4) + nl.attr(rtnl.IFA_ADDRESS, socket.inet_pton(
        socket.AF_INET6, "fd00::1"))
    assert rtnl.parse_addr(nl.Message(20, 0, 1, v6)) == rtnl.Address(socket.AF_INET6, 4, "fd00::1")
    short = rtnl.IFADDRMSG.pack(socket.AF_INET6, 64, 0, 0, 4) + nl.attr(rtnl.IFA_ADDRESS, b"\0" * 4)
    with pytest.raises(OSError, match="address of 4 bytes for family 10"):
        rtnl.parse_addr(nl.Message(20, 0, 1, short))


def test_parse_a_bpf_filter() -> None:
    options = nl.attr_u32(rtnl.TCA_BPF_FD, 9) + nl.attr_str(rtnl.TCA_BPF_NAME, "ambit_pod_ingress")
    payload = (rtnl.TCMSG.pack(0, 3, 0x539, INGRESS, (1 << 16) | 0x0300) + nl.attr_str(rtnl.TCA_KIND, "bpf")
               + nl.nested(rtnl.TCA_OPTIONS, [options]))
    assert rtnl.parse_filter(nl.Message(44, 0, 1, payload)) == rtnl.Filter(3, INGRESS, 0x539, 1, "bpf",
                                                                           "ambit_pod_ingress")
    chain_head = rtnl.TCMSG.pack(0, 3, 0, INGRESS, (1 << 16) | 0x0300) + nl.attr_str(rtnl.TCA_KIND, "bpf")
    assert rtnl.parse_filter(nl.Message(44, 0, 1, chain_head)).bpf_name is None


def test_a_short_header_is_an_eproto_naming_it() -> None:
    with pytest.raises(OSError, match="rtmsg: 3 bytes, shorter than its 12-byte header"):
        rtnl.parse_route(nl.Message(24, 0, 1, b"abc"))
