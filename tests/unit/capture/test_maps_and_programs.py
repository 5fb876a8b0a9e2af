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


def test_struct_sizes() -> None:
    assert ctypes.sizeof(maps.EventC) == 32
    assert ctypes.sizeof(maps.ConfigC) == 16
    assert ctypes.sizeof(maps.PodC) == 8
    assert ctypes.sizeof(maps.ProbePortC) == 8 and "struct ambit_probe_port" in HEADER


def test_probe_port_key_is_network_order() -> None:
    key = bytes(maps.ProbePortC.of("10.0.0.1", 8080))
    assert key == socket.inet_aton("10.0.0.1") + (8080).to_bytes(2, "big") + b"\0\0"
    assert "struct ambit_event" in HEADER and "32 bytes" in HEADER


def test_event_decodes() -> None:
    raw = struct.pack(
        "=QIIHHIBBBBHH",
        123,
        maps.ip_key("10.200.0.10"),
        maps.ip_key("10.200.1.10"),
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
    ev = maps.FlowEvent.from_bytes(raw)
    assert (ev.src, ev.sport, ev.dst, ev.dport) == ("10.200.0.10", 40000, "10.200.1.10", 8080)
    assert ev.type is maps.EventType.SYN and ev.verdict is maps.Verdict.REDIRECTED
    assert ev.listener_port == 15001 and ev.ifindex == 3


def test_ip_key_is_network_order() -> None:
    assert maps.ip_key("10.0.0.1").to_bytes(4, "little") == bytes([10, 0, 0, 1])
    assert maps.key_ip(maps.ip_key("192.168.200.11")) == "192.168.200.11"


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
