"""gRPC's status codes and header encodings as grpc itself has them: grpc-message's percent-encoding, grpc-timeout,
the HTTP status and RST_STREAM mappings."""

from __future__ import annotations

import grpc
import pytest
from h2.errors import ErrorCodes

from agent.rpc.status import (
    StatusCode,
    decode_message,
    encode_message,
    format_timeout,
    parse_timeout,
    status_of,
    status_of_http,
    status_of_reset,
)


def test_the_codes_are_grpcs() -> None:
    assert {c.name: c.value for c in StatusCode} == {c.name: c.value[0] for c in grpc.StatusCode}


@pytest.mark.parametrize(("text", "encoded"), [
    ("plain text, (all) printable!", b"plain text, (all) printable!"),
    ("100% sure", b"100%25 sure"),
    ("na\u00efve \u2713", b"na%C3%AFve %E2%9C%93"),
    ("line\nbreak\ttab", b"line%0Abreak%09tab"),
    ("", b""),
])
def test_grpc_message_is_percent_encoded_utf8(text: str, encoded: bytes) -> None:
    assert encode_message(text) == encoded
    assert decode_message(encoded) == text


def test_a_bad_percent_sequence_is_kept_and_bad_utf8_replaced() -> None:
    assert decode_message(b"50%-ish %zz %4") == "50%-ish %zz %4"
    assert decode_message(b"%FF%FE ok") == "\ufffd\ufffd ok"


@pytest.mark.parametrize(("value", "seconds"), [(b"1S", 1.0), (b"250m", 0.25), (b"2M", 120.0), (b"1H", 3600.0),
                                                (b"99999999u", 99.999999), (b"5n", 5e-9)])
def test_grpc_timeout_is_read(value: bytes, seconds: float) -> None:
    assert parse_timeout(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", [b"", b"S", b"1", b"1s", b"123456789S", b"-1S", b"1.5S", b" 1S", b"\xd9\xa3S"])
def test_a_bad_grpc_timeout_is_named(value: bytes) -> None:
    with pytest.raises(ValueError, match=r"grpc-timeout .* is not 1-8 digits and a unit"):
        parse_timeout(value)


def test_grpc_timeout_is_written_in_milliseconds_rounded_up() -> None:
    assert format_timeout(10.0) == b"10000m"
    assert format_timeout(0.0001) == b"1m"
    assert format_timeout(1e6) == b"1000000S"  # over 8 digits of milliseconds
    for seconds in (0.0001, 0.5, 10.0, 86400.0, 1e6):
        assert parse_timeout(format_timeout(seconds)) >= seconds


def test_status_headers_and_what_is_not_grpc() -> None:
    assert status_of(b"7") == StatusCode.PERMISSION_DENIED
    assert status_of(b"99") == StatusCode.UNKNOWN  # a code gRPC does not define
    assert status_of(None) is None and status_of(b"x") is None
    assert status_of_http(503) == StatusCode.UNAVAILABLE and status_of_http(404) == StatusCode.UNIMPLEMENTED
    assert status_of_http(418) == StatusCode.UNKNOWN
    assert status_of_reset(ErrorCodes.CANCEL) == StatusCode.CANCELLED
    assert status_of_reset(ErrorCodes.REFUSED_STREAM) == StatusCode.UNAVAILABLE
    assert status_of_reset(ErrorCodes.PROTOCOL_ERROR) == StatusCode.INTERNAL
