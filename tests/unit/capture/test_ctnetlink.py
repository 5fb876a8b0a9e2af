"""ctnetlink lookups by reply tuple, byte by byte: tuples laid out as `conntrack -G` (conntrack-tools 1.4.7) lays
them out, and the kernel's answers (Linux 6.18) to it for a connection DNATed from a VIP, parsed."""

from __future__ import annotations

import socket

import pytest

from agent.capture import ctnetlink as ct
from agent.capture import netlink as nl
from agent.capture.ctnetlink import Entry, Tuple

# `conntrack -G -s 10.77.0.2 -d 10.96.77.10 -p tcp --sport 40000 --dport 80`: its CTA_TUPLE_ORIG
TOOL_ORIG_V4 = ("34000180 14000180 08000100 0a4d0002 08000200 0a604d0a 1c000280 05000100 06000000 06000200 9c400000 "
                "06000300 00500000")
# the kernel's IPCTNL_MSG_CT_NEW answer to it (after `dnat ip to 10.77.0.1:8080` of 10.96.77.10:80)
KERNEL_ANSWER_V4 = (
    "d4000000 0001 0200 8bc1146b 0d6a0000 02000000 34000180 14000180 08000100 0a4d0002 08000200 0a604d0a 1c000280 "
    "05000100 06000000 06000200 9c400000 06000300 00500000 34000280 14000180 08000100 0a4d0001 08000200 0a4d0002 "
    "1c000280 05000100 06000000 06000200 1f900000 06000300 9c400000 08000300 000001ae 08000800 00000000 08000c00 "
    "df0d7264 08000b00 00000002 08000700 0006977f 30000480 2c000180 05000100 03000000 05000200 0a000000 05000300 "
    "0a000000 06000400 23000000 06000500 23000000")
# the same for IPv6: fd00:77::2:40001 -> [fd00:96:77::10]:80, DNATed to [fd00:77::1]:8080
KERNEL_ANSWER_V6 = (
    "04010000 0001 0200 8bc1146b 196a0000 0a000000 4c000180 2c000180 14000300 fd000077 00000000 00000000 00000002 "
    "14000400 fd000096 00770000 00000000 00000010 1c000280 05000100 06000000 06000200 9c410000 06000300 00500000 "
    "4c000280 2c000180 14000300 fd000077 00000000 00000000 00000001 14000400 fd000077 00000000 00000000 00000002 "
    "1c000280 05000100 06000000 06000200 1f900000 06000300 9c410000 08000300 000001ae 08000800 00000000 08000c00 "
    "f73285d3 08000b00 00000002 08000700 0006977f 30000480 2c000180 05000100 03000000 05000200 0a000000 05000300 "
    "0a000000 06000400 23000000 06000500 23000000")


def _hex(s: str) -> bytes:
    return bytes.fromhex(s.replace(" ", ""))


def test_a_tuple_is_laid_out_as_conntrack_tools_lays_it_out() -> None:
    src, dst = (socket.inet_aton("10.77.0.2"), 40000), (socket.inet_aton("10.96.77.10"), 80)
    assert ct._tuple_attr(ct.CTA_TUPLE_ORIG, socket.AF_INET, socket.IPPROTO_TCP, src, dst).hex() == _hex(
        TOOL_ORIG_V4).hex()


def test_the_request_by_reply_tuple() -> None:
    request = ct.get_by_reply(("10.77.0.1", 8080), ("10.77.0.2", 40000))
    assert nl.encode(request, 0x6B14C18B).hex() == _hex(
        "48000000 0101 0100 8bc1146b 00000000"  # CTNETLINK << 8 | CT_GET, NLM_F_REQUEST
        " 02000000"  # nfgenmsg: AF_INET, v0, res_id 0
        " 34000280 14000180 08000100 0a4d0001 08000200 0a4d0002"  # CTA_TUPLE_REPLY: 10.77.0.1 -> 10.77.0.2
        " 1c000280 05000100 06000000 06000200 1f900000 06000300 9c400000"  # TCP 8080 -> 40000
    ).hex()
    assert request.what == "conntrack get by reply 10.77.0.1:8080 -> 10.77.0.2:40000"
    mapped = ct.get_by_reply(("::ffff:10.77.0.1", 8080), ("::ffff:10.77.0.2", 40000))
    assert mapped.body == request.body


def test_ipv6_is_ipv6() -> None:
    v6 = ct.get_by_reply(("fd00:77::1", 8080), ("fd00:77::2", 40001))
    assert v6.body[:4] == bytes([socket.AF_INET6, 0, 0, 0])
    assert v6.what.endswith("[fd00:77::1]:8080 -> [fd00:77::2]:40001")


@pytest.mark.parametrize(("local", "peer", "error"), [
    (("10.77.0.1", 8080), ("fd00::2", 1), "are not of one address family"),
    (("10.77.0.1", 70000), ("10.77.0.2", 1), "port 70000 out of range"),
    (("not-an-ip", 1), ("10.77.0.2", 1), "'not-an-ip' is not an IP address"),
    (("fd00::zz", 1), ("10.77.0.2", 1), "'fd00::zz' is not an IP address"),
])
def test_bad_input_is_a_value_error_naming_it(local: ct.Endpoint, peer: ct.Endpoint, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        ct.get_by_reply(local, peer)


@pytest.mark.parametrize(("answer", "original", "reply"), [
    (KERNEL_ANSWER_V4, Tuple(6, ("10.77.0.2", 40000), ("10.96.77.10", 80)), Tuple(6, ("10.77.0.1", 8080),
                                                                                ("10.77.0.2", 40000))),
    (KERNEL_ANSWER_V6, Tuple(6, ("fd00:77::2", 40001), ("fd00:96:77::10", 80)), Tuple(6, ("fd00:77::1", 8080),
                                                                                    ("fd00:77::2", 40001))),
])
def test_parse_the_kernels_answer(answer: str, original: Tuple, reply: Tuple) -> None:
    (msg,) = nl.split_messages(_hex(answer))
    entry = ct.parse_entry(msg)
    assert entry == Entry(original, reply)
    assert ct.translated_destination(entry) == original.dst


def test_an_entry_without_dnat_has_no_other_destination() -> None:
    t = Tuple(6, ("10.77.0.2", 40000), ("10.77.0.1", 8080))
    assert ct.translated_destination(Entry(t, Tuple(6, t.dst, t.src))) is None


def test_a_malformed_answer_is_an_eproto_naming_what_is_missing() -> None:
    (msg,) = nl.split_messages(_hex(KERNEL_ANSWER_V4))
    header = ct.NFGENMSG.pack(socket.AF_INET, 0, 0)
    orig_only = header + _hex(TOOL_ORIG_V4)
    with pytest.raises(OSError, match="conntrack entry without its reply tuple"):
        ct.parse_entry(nl.Message(msg.type, 0, 1, orig_only))
    with pytest.raises(OSError, match="conntrack answer of type 0x102"):
        ct.parse_entry(nl.Message(0x102, 0, 1, msg.payload))
    truncated_ip = header + nl.nested(ct.CTA_TUPLE_ORIG, [nl.nested(ct.CTA_TUPLE_IP, [nl.attr(1, b"\x0a\x4d")])])
    with pytest.raises(OSError, match="original tuple: no 4-byte address 1"):
        ct.parse_entry(nl.Message(msg.type, 0, 1, truncated_ip))
