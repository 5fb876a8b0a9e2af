"""A ring-buffer event decodes as the ctypes mirror of struct ambit_event reads it, addresses spelled as key_ip
spells them, and a value the header does not define is refused naming the field; its kind bytes (type to
reason) decode alone to the same values, with the same refusals; its address bytes are key_ip's."""

from __future__ import annotations

import ctypes
import socket
import struct

import pytest

from agent.capture import maps


def _record(src: bytes, dst: bytes, *, type_: int = 1, hook: int = 0, verdict: int = 1, reason: int = 0) -> bytes:
    return struct.pack("=Q16s16sHHIBBBBHH", 987654321, src, dst, socket.htons(40000), socket.htons(443), 7,
                       type_, 0x12, hook, verdict, 15008, reason)


@pytest.mark.parametrize("ip", ["10.200.0.10", "0.0.0.0", "255.255.255.255", "fd00:200::10", "::1", "::",
                                "::10.0.0.1", "fe80::1:0:0:1", "1:0:0:1:0:0:0:1", "2001:db8::ffff:0:1"])
def test_an_event_decodes_as_the_ctypes_mirror_reads_it(ip: str) -> None:
    raw = _record(maps.ip_key(ip), maps.ip_key("fd00::1"), type_=maps.EventType.RST, hook=maps.Hook.DOOR,
                  verdict=maps.Verdict.DROPPED, reason=maps.Reason.SPOOFED)
    ev = maps.FlowEvent.from_bytes(raw)
    c = maps.EventC.from_buffer_copy(raw)
    assert (ev.src, ev.dst) == (c.saddr.ip, c.daddr.ip) == (maps.key_ip(maps.ip_key(ip)), "fd00::1")
    assert (ev.sport, ev.dport, ev.ifindex, ev.tcp_flags, ev.listener_port, ev.ts_ns) == (
        socket.ntohs(c.sport), socket.ntohs(c.dport), 7, 0x12, 15008, 987654321)
    assert ev.type is maps.EventType.RST and ev.hook is maps.Hook.DOOR
    assert ev.verdict is maps.Verdict.DROPPED and ev.reason is maps.Reason.SPOOFED
    assert len(raw) == ctypes.sizeof(maps.EventC)


@pytest.mark.parametrize(("field", "values"), [("type", {"type_": 9}), ("hook", {"hook": 3}),
                                               ("verdict", {"verdict": 0}), ("reason", {"reason": 99})])
def test_an_undefined_value_is_refused_naming_the_field(field: str, values: dict[str, int]) -> None:
    raw = _record(maps.ip_key("10.0.0.1"), maps.ip_key("10.0.0.2"), **values)
    with pytest.raises(ValueError, match=rf"ambit_event\.{field}: unknown value {next(iter(values.values()))}"):
        maps.FlowEvent.from_bytes(raw)


def test_a_record_of_another_size_is_refused() -> None:
    raw = _record(maps.ip_key("10.0.0.1"), maps.ip_key("10.0.0.2"))
    for bad in (raw[:50], raw + bytes(8)):
        with pytest.raises(ValueError, match=rf"ambit_event: a record of {len(bad)} bytes, the struct has 56"):
            maps.FlowEvent.from_bytes(bad)


@pytest.mark.parametrize("ip", ["10.200.0.10", "fd00:200::10", "::1"])
def test_kind_and_addresses_read_from_their_byte_ranges_say_what_the_whole_record_says(ip: str) -> None:
    raw = _record(maps.ip_key(ip), maps.ip_key("10.0.0.2"), type_=maps.EventType.DROP, hook=maps.Hook.UPLINK,
                  verdict=maps.Verdict.DROPPED, reason=maps.Reason.NO_LISTENER)
    ev, kind = maps.FlowEvent.from_bytes(raw), maps.EventKind.from_bytes(raw[maps.EVENT_KIND])
    assert (kind.type, kind.tcp_flags, kind.hook, kind.verdict, kind.listener_port, kind.reason) == (
        ev.type, ev.tcp_flags, ev.hook, ev.verdict, ev.listener_port, ev.reason)
    assert (kind.action, kind.reason_text) == (ev.action, ev.reason_text) == (
        "drop", "no agent listener (agent down), fail-closed")
    assert raw[maps.EVENT_SOURCE] == maps.ip_key(ip) and raw[maps.EVENT_DESTINATION] == maps.ip_key("10.0.0.2")
    assert maps.event_ip(raw[maps.EVENT_SOURCE]) == ev.src
    assert maps.FlowEvent.from_bytes(ev.to_bytes()) == ev and ev.to_bytes() == raw


@pytest.mark.parametrize(("field", "values"), [("type", {"type_": 9}), ("hook", {"hook": 3}),
                                               ("verdict", {"verdict": 0}), ("reason", {"reason": 99})])
def test_an_undefined_value_in_the_kind_is_refused_naming_the_field(field: str, values: dict[str, int]) -> None:
    raw = _record(maps.ip_key("10.0.0.1"), maps.ip_key("10.0.0.2"), **values)
    with pytest.raises(ValueError, match=rf"ambit_event\.{field}: unknown value {next(iter(values.values()))}"):
        maps.EventKind.from_bytes(raw[maps.EVENT_KIND])
