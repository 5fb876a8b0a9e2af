"""gRPC's messages and headers on HTTP/2 (PROTOCOL-HTTP2.md), free of I/O: length-prefixed messages, a request's
headers checked, a response's read."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from agent.rpc.status import (
    RpcError,
    StatusCode,
    decode_message,
    encode_message,
    parse_timeout,
    status_of,
    status_of_http,
)

MAX_MESSAGE = 4 * 1024 * 1024  # bytes of one received message: grpc's default limit
CONTENT_TYPE = b"application/grpc"
Headers = Sequence[tuple[bytes, bytes]]


def frame(message: bytes) -> bytes:
    """A Length-Prefixed-Message, uncompressed."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


class MessageReader:
    """The messages of one direction of a stream, as its DATA completes them. A message over ``limit`` bytes, or
    one flagged compressed (no compression is negotiated: grpc-accept-encoding is identity), raises RpcError."""

    def __init__(self, limit: int = MAX_MESSAGE) -> None:
        self.limit = limit
        self._buf = bytearray()

    def feed(self, data: bytes | memoryview) -> list[bytes]:
        buf = self._buf
        buf += data
        out = []
        while len(buf) >= 5:
            if buf[0] != 0:
                raise RpcError(StatusCode.INTERNAL, f"message flag {buf[0]}: compressed, with no grpc-encoding "
                                                    "negotiated" if buf[0] == 1 else f"message flag {buf[0]}")
            length = int.from_bytes(buf[1:5], "big")
            if length > self.limit:
                raise RpcError(StatusCode.RESOURCE_EXHAUSTED, f"a message of {length} bytes exceeds the limit of "
                                                              f"{self.limit}")
            if len(buf) < 5 + length:
                break
            out.append(bytes(buf[5:5 + length]))
            del buf[:5 + length]
        return out

    @property
    def partial(self) -> int:
        """Bytes of a message not complete yet (at the end of the stream: a truncated message)."""
        return len(self._buf)


class NotGrpc(Exception):
    """A request that is not gRPC at all: answered with an HTTP status, not a gRPC one."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Request:
    path: str
    timeout: float | None  # seconds, from grpc-timeout
    metadata: dict[str, str]  # the other headers, lower-case names (values decoded as Latin-1)


def read_request(headers: Headers) -> Request:
    """A request's headers checked: NotGrpc (405, 415) for what is not a gRPC call, RpcError for a gRPC call this
    server cannot take (compressed, a bad grpc-timeout)."""
    fields = dict(headers)
    if fields.get(b":method") != b"POST":
        raise NotGrpc(405, f"method {fields.get(b':method', b'').decode(errors='replace')!r}: gRPC is POST")
    content_type = fields.get(b"content-type", b"")
    if not (content_type == CONTENT_TYPE or content_type.startswith((CONTENT_TYPE + b"+", CONTENT_TYPE + b";"))):
        raise NotGrpc(415, f"content-type {content_type.decode(errors='replace')!r} is not application/grpc")
    encoding = fields.get(b"grpc-encoding", b"identity")
    if encoding != b"identity":
        raise RpcError(StatusCode.UNIMPLEMENTED, f"grpc-encoding {encoding.decode(errors='replace')!r} is not "
                                                 "supported (identity only)")
    timeout = None
    if b"grpc-timeout" in fields:
        try:
            timeout = parse_timeout(fields[b"grpc-timeout"])
        except ValueError as e:
            raise RpcError(StatusCode.INVALID_ARGUMENT, str(e)) from None
    metadata = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers if not k.startswith(b":")}
    return Request(fields.get(b":path", b"").decode(errors="replace"), timeout, metadata)


RESPONSE_HEADERS = ((b":status", b"200"), (b"content-type", CONTENT_TYPE), (b"grpc-accept-encoding", b"identity"))


def trailers(code: StatusCode, details: str = "") -> list[tuple[bytes, bytes]]:
    out = [(b"grpc-status", str(int(code)).encode())]
    if details:
        out.append((b"grpc-message", encode_message(details)))
    return out


def request_headers(authority: str, path: str, *, scheme: str = "https", timeout: bytes | None = None,
                    metadata: Sequence[tuple[str, str]] = ()) -> list[tuple[bytes, bytes]]:
    out = [(b":method", b"POST"), (b":scheme", scheme.encode()), (b":path", path.encode()),
           (b":authority", authority.encode()), (b"te", b"trailers"), (b"content-type", CONTENT_TYPE),
           (b"user-agent", b"ambit-agent")]
    if timeout is not None:
        out.append((b"grpc-timeout", timeout))
    out += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in metadata]
    return out


def response_status(headers: Headers, trailers_: Headers | None) -> RpcError | None:
    """The outcome of a finished call from its response headers and trailers (None: OK). A response that is not
    gRPC's (an HTTP error, another content-type, no grpc-status) is an RpcError too."""
    fields = dict(headers)
    status = fields.get(b":status", b"")
    if status != b"200":
        http = status_of_http(int(status)) if status.isdigit() else StatusCode.UNKNOWN
        return RpcError(http, f"the server answered HTTP {status.decode(errors='replace')}, not gRPC")
    content_type = fields.get(b"content-type", b"")
    if not content_type.startswith(CONTENT_TYPE):
        return RpcError(StatusCode.UNKNOWN,
                        f"the server answered content-type {content_type.decode(errors='replace')!r}, not gRPC")
    final = dict(trailers_) if trailers_ is not None else fields  # no trailers: a Trailers-Only response
    code = status_of(final.get(b"grpc-status"))
    if code is None:
        return RpcError(StatusCode.INTERNAL, "the response ended without a grpc-status")
    if code == StatusCode.OK:
        return None
    return RpcError(code, decode_message(final.get(b"grpc-message", b"")))
