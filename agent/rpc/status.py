"""gRPC status codes and the encodings of gRPC's own headers (grpc-message, grpc-timeout)."""

from __future__ import annotations

import enum
import math
import re

from h2.errors import ErrorCodes


class StatusCode(enum.IntEnum):
    """gRPC's status codes (grpc/doc/statuscodes.md), by their names in grpc's Python package."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class RpcError(Exception):
    """A call ended with a status other than OK: raised by handlers to answer with it, and by the client."""

    def __init__(self, code: StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


def status_of(value: bytes | None) -> StatusCode | None:
    """The grpc-status header's code; None when absent or not a number. A number gRPC does not define is
    UNKNOWN (as grpc's own clients read it)."""
    if value is None or not value.isdigit():
        return None
    try:
        return StatusCode(int(value))
    except ValueError:
        return StatusCode.UNKNOWN


def encode_message(text: str) -> bytes:
    """grpc-message's percent-encoding: UTF-8, every byte but printable ASCII other than '%' as %XX."""
    return "".join(chr(b) if 0x20 <= b <= 0x7E and b != 0x25 else f"%{b:02X}" for b in text.encode()).encode()


_PERCENT = re.compile(rb"%([0-9A-Fa-f]{2})")


def decode_message(value: bytes) -> str:
    """grpc-message decoded; a '%' not followed by two hex digits stays as it is, bad UTF-8 is replaced."""
    return _PERCENT.sub(lambda m: bytes([int(m.group(1), 16)]), value).decode(errors="replace")


_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


def parse_timeout(value: bytes) -> float:
    """grpc-timeout in seconds: 1 to 8 digits and a unit (H, M, S, m, u, n). ValueError naming the value
    otherwise."""
    unit = _TIMEOUT_UNITS.get(value[-1:])
    digits = value[:-1]
    if unit is None or not 1 <= len(digits) <= 8 or not digits.isdigit():
        raise ValueError(f"grpc-timeout {value.decode(errors='replace')!r} is not 1-8 digits and a unit of H M S m "
                         "u n")
    return int(digits) * unit


def format_timeout(seconds: float) -> bytes:
    """grpc-timeout for ``seconds`` (> 0) in milliseconds, rounded up; whole seconds beyond 8 digits of those."""
    ms = max(1, math.ceil(seconds * 1000))
    return f"{ms}m".encode() if ms < 10**8 else f"{min(math.ceil(seconds), 10**8 - 1)}S".encode()


# What a client reports for a response that is not gRPC's (grpc/doc/http-grpc-status-mapping.md) ...
_HTTP_STATUS: dict[int, StatusCode] = {
    400: StatusCode.INTERNAL, 401: StatusCode.UNAUTHENTICATED, 403: StatusCode.PERMISSION_DENIED,
    404: StatusCode.UNIMPLEMENTED, 429: StatusCode.UNAVAILABLE, 502: StatusCode.UNAVAILABLE,
    503: StatusCode.UNAVAILABLE, 504: StatusCode.UNAVAILABLE}
# ... and for a stream the server reset (PROTOCOL-HTTP2.md, "Errors")
_RESET: dict[int, StatusCode] = {
    ErrorCodes.REFUSED_STREAM: StatusCode.UNAVAILABLE, ErrorCodes.CANCEL: StatusCode.CANCELLED,
    ErrorCodes.ENHANCE_YOUR_CALM: StatusCode.RESOURCE_EXHAUSTED,
    ErrorCodes.INADEQUATE_SECURITY: StatusCode.PERMISSION_DENIED}


def status_of_http(status: int) -> StatusCode:
    return _HTTP_STATUS.get(status, StatusCode.UNKNOWN)


def status_of_reset(error_code: int) -> StatusCode:
    return _RESET.get(error_code, StatusCode.INTERNAL)
