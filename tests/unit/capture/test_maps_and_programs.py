"""Capture pieces that need no root: the C header and its Python mirror agree, events decode, errors say
what is missing."""

from __future__ import annotations

import ctypes
import re
import socket
import struct
from pathlib import Path

import pytest

from agent.capture import maps
from agent.capture.programs import BPF_DIR, RedirectError, compile_programs

HEADER = (Path(BPF_DIR) / "redirect.h").read_text()


def _defines(prefix: str) -> dict[str, int]:
    out = {}
    for name, value in re.findall(rf"#define (AMBIT_{prefix}_\w+)\s+\(?(1u << \d+|\d+)\)?", HEADER):
        out[name] = eval(value.replace("u", ""))  # "1u << 0" or a number
    return out


@pytest.mark.parametrize(
    ("prefix", "enum"),
    [
        ("EV", maps.EventType),
        ("V", maps.Verdict),
        ("R", maps.Reason),
        ("D", maps.Hook),
        ("L", maps.Listener),
        ("C", maps.Counter),
    ],
)
def test_enums_match_header(prefix: str, enum: type) -> None:
    defined = {k.removeprefix(f"AMBIT_{prefix}_"): v for k, v in _defines(prefix).items()}
    defined.pop("COUNT", None)
    assert defined == {m.name: int(m) for m in enum}  # type: ignore[attr-defined]


def test_flags_and_roles_match_header() -> None:
    d = _defines("F") | _defines("IF")
    assert d["AMBIT_F_FAIL_OPEN"] == maps.F_FAIL_OPEN
    assert d["AMBIT_F_LOOKUP_SELECTS"] == maps.F_LOOKUP_SELECTS
    assert d["AMBIT_F_NODE_PASSES"] == maps.F_NODE_PASSES
    assert d["AMBIT_IF_POD"] == maps.IF_POD
    assert d["AMBIT_IF_UPLINK"] == maps.IF_UPLINK


def _struct_fields(name: str) -> list[tuple[str, str]]:
    """(type, field) of each member of a struct in the header, in order."""
    body = re.search(rf"struct {name} {{(.*?)\n}};", HEADER, re.S)
    assert body is not None, name
    fields = re.findall(r"^\s*((?:struct )?\w+)\s+(\w+)(?:\[\w+\])?;", body.group(1), re.M)
    return [(t, f) for t, f in fields]


@pytest.mark.parametrize(
    ("struct_name", "mirror"),
    [("ambit_addr", maps.AddrC), ("ambit_probe_port", maps.ProbePortC), ("ambit_event", maps.EventC),
     ("ambit_config", maps.ConfigC), ("ambit_pod", maps.PodC), ("ambit_bridge_port", maps.BridgePortC)],
)
def test_struct_fields_match_header(struct_name: str, mirror: type[ctypes.Structure]) -> None:
    assert [f for _t, f in _struct_fields(struct_name)] == [f[0] for f in mirror._fields_]


def test_struct_sizes() -> None:
    assert ctypes.sizeof(maps.AddrC) == 16
    assert ctypes.sizeof(maps.EventC) == 56 and "56 bytes" in HEADER
    assert ctypes.sizeof(maps.ConfigC) == 16
    assert ctypes.sizeof(maps.PodC) == 8
    assert ctypes.sizeof(maps.ProbePortC) == 20


def test_probe_port_key_is_network_order() -> None:
    key = bytes(maps.ProbePortC.of("10.0.0.1", 8080))
    assert key == b"\0" * 10 + b"\xff\xff" + socket.inet_aton("10.0.0.1") + (8080).to_bytes(2, "big") + b"\0\0"
    key6 = bytes(maps.ProbePortC.of("fd00:200::10", 8080))
    assert key6 == socket.inet_pton(socket.AF_INET6, "fd00:200::10") + (8080).to_bytes(2, "big") + b"\0\0"


@pytest.mark.parametrize(("src", "dst"), [("10.200.0.10", "10.200.1.10"), ("fd00:200::10", "fd00:200:1::10")])
def test_event_decodes(src: str, dst: str) -> None:
    raw = struct.pack(
        "=Q16s16sHHIBBBBHH",
        123,
        maps.ip_key(src),
        maps.ip_key(dst),
        socket.htons(40000),
        socket.htons(8080),
        3,
        maps.EventType.SYN,
        0x02,
        maps.Hook.POD,
        maps.Verdict.REDIRECTED,
        15001,
        maps.Reason.NONE,
    )
    assert len(raw) == ctypes.sizeof(maps.EventC)
    ev = maps.FlowEvent.from_bytes(raw)
    assert (ev.src, ev.sport, ev.dst, ev.dport) == (src, 40000, dst, 8080)
    assert ev.type is maps.EventType.SYN and ev.verdict is maps.Verdict.REDIRECTED
    assert ev.listener_port == 15001 and ev.ifindex == 3


def test_ip_key_is_16_bytes_ipv4_mapped() -> None:
    assert maps.ip_key("10.0.0.1") == bytes([0] * 10 + [0xFF, 0xFF, 10, 0, 0, 1])
    assert maps.ip_key("::ffff:10.0.0.1") == maps.ip_key("10.0.0.1")  # one key whichever way IPv4 is spelled
    assert maps.ip_key("fd00:200:0::10") == socket.inet_pton(socket.AF_INET6, "fd00:200::10")
    for ip in ("192.168.200.11", "fd00:200::10", "::1"):
        assert maps.key_ip(maps.ip_key(ip)) == ip
    assert maps.key_ip(maps.ip_key("::ffff:10.0.0.1")) == "10.0.0.1"
    assert maps.canonical("FD00:0200:0000::0010") == "fd00:200::10"


def test_bad_address_named() -> None:
    with pytest.raises(ValueError, match=r"not an IP address: '10\.0\.0\.256'"):
        maps.ip_key("10.0.0.256")
    with pytest.raises(ValueError, match="'pod-a'"):
        maps.ProbePortC.of("pod-a", 80)


def test_listener_slots_match_header() -> None:
    assert _defines("L")["AMBIT_L_COUNT"] == maps.LISTENER_FAMILY_STRIDE == len(maps.Listener)
    assert "#define AMBIT_LISTENER_SLOTS (2 * AMBIT_L_COUNT)" in HEADER


def test_missing_kernel_headers_named(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    real = os.uname()

    class FakeUname:
        release = "0.0.0-no-such-kernel"
        sysname, nodename, version, machine = real.sysname, real.nodename, real.version, real.machine

    pytest.importorskip("bcc")
    monkeypatch.setattr(os, "uname", FakeUname)
    with pytest.raises(RedirectError, match=r"kernel headers not found.*bootstrap\.sh"):
        compile_programs()
