"""Netlink framing, attributes and answers, byte by byte (agent/capture/netlink.py), and the socket's bounds on a
real NETLINK_ROUTE socket (no root needed for a get of lo)."""

from __future__ import annotations

import errno
import socket
import struct

import pytest

from agent.capture import netlink as nl
from agent.capture.netlink import Collector, Message, Request

ACK = nl.NLM_F_REQUEST | nl.NLM_F_ACK


def test_attributes_are_padded_and_nested_ones_flagged() -> None:
    assert nl.attr_str(3, "lo") == bytes.fromhex("07000300 6c6f0000")
    assert nl.attr_u8(1, 6) == bytes.fromhex("05000100 06000000")
    assert nl.attr_be16(2, 40000) == bytes.fromhex("06000200 9c400000")
    assert nl.attr_u32(6, 100) == bytes.fromhex("08000600 64000000")
    inner = nl.attr_u32(1, 7)
    assert nl.nested(2, [inner, inner]) == bytes.fromhex("14000280") + inner + inner


def test_parse_attrs_round_trip_masks_flags_and_keeps_the_first() -> None:
    buf = nl.nested(2, [nl.attr_u32(1, 7)]) + nl.attr_str(3, "veth0") + nl.attr_u32(3, 9)
    attrs = nl.parse_attrs(buf)
    assert nl.get_u32(nl.parse_attrs(attrs[2]), 1) == 7
    assert nl.get_str(attrs, 3) == "veth0"
    assert nl.get_u32(attrs, 99, default=5) == 5


@pytest.mark.parametrize("bad", [
    bytes.fromhex("0c000100 01000000"),  # claims 12 bytes, has 8
    bytes.fromhex("02000100 00000000"),  # shorter than its own header
])
def test_a_malformed_attribute_is_an_eproto_naming_where(bad: bytes) -> None:
    with pytest.raises(OSError) as e:
        nl.parse_attrs(bad, where="link")
    assert e.value.errno == errno.EPROTO and "link: attribute 1" in str(e.value)


def test_a_short_attribute_value_is_an_eproto() -> None:
    with pytest.raises(OSError, match="attribute 4 has 2 bytes, expected 4"):
        nl.get_u32({4: b"\0\0"}, 4)


def test_encode_and_split_messages() -> None:
    req = Request("x", 18, nl.NLM_F_REQUEST, b"\x01\x02\x03")
    data = nl.encode(req, seq=7)
    assert data == struct.pack("=IHHII", 19, 18, 1, 7, 0) + b"\x01\x02\x03"
    two = data + b"\0" + data  # the second starts at the next 4-byte boundary
    assert nl.split_messages(two) == [Message(18, 1, 7, b"\x01\x02\x03")] * 2
    with pytest.raises(OSError, match="message of length 64 at offset 0 in a 19-byte datagram"):
        nl.split_messages(struct.pack("=IHHII", 64, 18, 1, 7, 0) + b"\x01\x02\x03")


def _error(err: int, seq: int = 1, text: str | None = None) -> Message:
    payload = struct.pack("=i", -err) + struct.pack("=IHHII", 40, 36, ACK, seq, 0)
    flags = 0
    if text is not None:
        payload += nl.attr_str(nl.NLMSGERR_ATTR_MSG, text)
        flags = nl.NLM_F_ACK_TLVS
    return Message(nl.NLMSG_ERROR, flags, seq, payload)


def test_a_refusal_names_the_request_the_errno_and_the_kernels_words() -> None:
    c = Collector(Request("tc qdisc add clsact on ifindex 7", 36, ACK, b""), seq=1)
    with pytest.raises(OSError) as e:
        c.feed(_error(errno.EEXIST, text="Exclusivity flag on, cannot modify"))
    assert e.value.errno == errno.EEXIST
    assert e.value.strerror == ("tc qdisc add clsact on ifindex 7: EEXIST (File exists): Exclusivity flag on, "
                                "cannot modify")


def test_an_ack_ends_a_change_and_other_sequence_numbers_are_ignored() -> None:
    c = Collector(Request("rule add", 32, ACK, b""), seq=5)
    assert not c.feed(_error(errno.EEXIST, seq=4))  # a late answer to an earlier request: not ours
    assert c.feed(_error(0, seq=5)) and c.result == []


def test_a_get_ends_with_its_one_answer_and_a_dump_with_done() -> None:
    get = Collector(Request("link get", 18, nl.NLM_F_REQUEST, b""), seq=1)
    assert get.feed(Message(16, 0, 1, b"link")) and get.result == [Message(16, 0, 1, b"link")]
    dump = Collector(Request("link dump", 18, nl.NLM_F_REQUEST | nl.NLM_F_DUMP, b""), seq=1)
    assert not dump.feed(Message(16, nl.NLM_F_MULTI, 1, b"a"))
    assert not dump.feed(Message(16, nl.NLM_F_MULTI | nl.NLM_F_DUMP_INTR, 1, b"b"))
    assert dump.feed(Message(nl.NLMSG_DONE, nl.NLM_F_MULTI, 1, struct.pack("=i", 0)))
    assert [m.payload for m in dump.result] == [b"a", b"b"] and dump.interrupted


def test_a_failed_dump_carries_its_errno_in_done() -> None:
    dump = Collector(Request("route dump of table 100 (IPv4)", 26, nl.NLM_F_REQUEST | nl.NLM_F_DUMP, b""), seq=1)
    with pytest.raises(OSError, match=r"route dump of table 100 \(IPv4\): ENOENT") as e:
        dump.feed(Message(nl.NLMSG_DONE, nl.NLM_F_MULTI, 1, struct.pack("=i", -errno.ENOENT)))
    assert e.value.errno == errno.ENOENT


def test_done_in_answer_to_a_get_is_malformed() -> None:
    c = Collector(Request("link get lo", 18, nl.NLM_F_REQUEST, b""), seq=1)
    with pytest.raises(OSError, match="NLMSG_DONE in answer to a request that is not a dump"):
        c.feed(Message(nl.NLMSG_DONE, 0, 1, struct.pack("=i", 0)))


def test_a_real_socket_answers_and_names_a_refused_request() -> None:
    from agent.capture.rtnl import get_link, parse_link

    with nl.NetlinkSocket(socket.NETLINK_ROUTE, strict=True) as sock:
        assert sock.request(get_link(name="lo"), parse_link)[0].name == "lo"
        with pytest.raises(OSError) as e:
            sock.request(get_link(name="nonexistent0"), parse_link)
    assert e.value.errno == errno.ENODEV and "link get nonexistent0: ENODEV" in str(e.value)


def test_no_answer_is_a_timeout_naming_the_request_not_a_hang() -> None:
    """NETLINK_ROUTE answers nothing to a message type no family handles with no ACK asked (a NOOP)."""
    with (nl.NetlinkSocket(socket.NETLINK_ROUTE, timeout=0.2) as sock,
          pytest.raises(TimeoutError, match=r"noop: no answer from the kernel within 0\.2 s")):
        sock.request(Request("noop", nl.NLMSG_NOOP, nl.NLM_F_REQUEST, b""), lambda m: m)


def test_a_malformed_answer_through_parse_is_renamed_after_the_request() -> None:
    from agent.capture.rtnl import get_link

    def parse(msg: Message) -> None:
        nl.parse_attrs(b"\x40\x00\x01\x00", where="link")

    with nl.NetlinkSocket(socket.NETLINK_ROUTE) as sock, pytest.raises(OSError) as e:
        sock.request(get_link(name="lo"), parse)
    assert e.value.errno == errno.EPROTO and str(e.value).startswith("[Errno 71] link get lo: malformed netlink")
