"""gRPC's length-prefixed messages and the headers of a call, without I/O: messages split anywhere or packed
together are read whole; a compressed or oversized message, a request that is not gRPC and a response that is not
gRPC are each refused with a status naming what."""

from __future__ import annotations

import pytest

from agent.rpc.status import RpcError, StatusCode
from agent.rpc.wire import MessageReader, NotGrpc, frame, read_request, request_headers, response_status, trailers


def test_messages_split_anywhere_or_packed_together_are_read_whole() -> None:
    messages = [b"", b"a", b"x" * 70_000, b"last"]
    stream = b"".join(frame(m) for m in messages)
    for step in (1, 3, 5, 4096, len(stream)):
        reader = MessageReader()
        got = []
        for i in range(0, len(stream), step):
            got += reader.feed(stream[i:i + step])
        assert got == messages and reader.partial == 0
    reader = MessageReader()
    assert reader.feed(frame(b"abc")[:-1]) == [] and reader.partial == 7


@pytest.mark.parametrize(("data", "code", "message"), [
    (b"\x01\x00\x00\x00\x01z", StatusCode.INTERNAL, "compressed, with no grpc-encoding negotiated"),
    (b"\x07\x00\x00\x00\x01z", StatusCode.INTERNAL, "message flag 7"),
    (b"\x00\x00\x00\x04\x01", StatusCode.RESOURCE_EXHAUSTED, "a message of 1025 bytes exceeds the limit of 1024"),
])
def test_bad_messages_are_refused_with_a_status(data: bytes, code: StatusCode, message: str) -> None:
    with pytest.raises(RpcError) as e:
        MessageReader(limit=1024).feed(data)
    assert e.value.code == code and message in e.value.details


def test_a_request_is_read_from_its_headers() -> None:
    headers = request_headers("ca.svc", "/p.S/M", timeout=b"1500m", metadata=[("authorization", "Bearer t")])
    request = read_request(headers)
    assert request.path == "/p.S/M" and request.timeout == 1.5
    assert request.metadata["authorization"] == "Bearer t" and request.metadata["te"] == "trailers"
    assert read_request([*headers[:5], (b"content-type", b"application/grpc+proto")]).timeout is None


@pytest.mark.parametrize(("change", "status", "message"), [
    ((b":method", b"GET"), 405, "method 'GET': gRPC is POST"),
    ((b"content-type", b"application/json"), 415, "content-type 'application/json' is not application/grpc"),
    ((b"content-type", b"application/grpcx"), 415, "is not application/grpc"),
])
def test_what_is_not_grpc_gets_an_http_status(change: tuple[bytes, bytes], status: int, message: str) -> None:
    headers = [change if name == change[0] else (name, value) for name, value in request_headers("a", "/p.S/M")]
    with pytest.raises(NotGrpc, match=message) as e:
        read_request(headers)
    assert e.value.status == status


@pytest.mark.parametrize(("extra", "code", "message"), [
    ((b"grpc-encoding", b"gzip"), StatusCode.UNIMPLEMENTED, "grpc-encoding 'gzip' is not supported"),
    ((b"grpc-timeout", b"soon"), StatusCode.INVALID_ARGUMENT, "grpc-timeout 'soon'"),
])
def test_a_call_this_server_cannot_take_gets_a_grpc_status(extra: tuple[bytes, bytes], code: StatusCode,
                                                          message: str) -> None:
    with pytest.raises(RpcError) as e:
        read_request([*request_headers("a", "/p.S/M"), extra])
    assert e.value.code == code and message in e.value.details


OK_HEADERS = [(b":status", b"200"), (b"content-type", b"application/grpc")]


def test_a_response_status_from_trailers_or_a_trailers_only_response() -> None:
    assert response_status(OK_HEADERS, trailers(StatusCode.OK)) is None
    error = response_status(OK_HEADERS, trailers(StatusCode.NOT_FOUND, "no such 100% thing"))
    assert error is not None and error.code == StatusCode.NOT_FOUND and error.details == "no such 100% thing"
    only = response_status([*OK_HEADERS, *trailers(StatusCode.PERMISSION_DENIED, "no")], None)
    assert only is not None and only.code == StatusCode.PERMISSION_DENIED and only.details == "no"


@pytest.mark.parametrize(("headers", "final", "code", "message"), [
    ([(b":status", b"503")], None, StatusCode.UNAVAILABLE, "HTTP 503, not gRPC"),
    ([(b":status", b"200"), (b"content-type", b"text/html")], None, StatusCode.UNKNOWN, "'text/html', not gRPC"),
    (OK_HEADERS, [], StatusCode.INTERNAL, "ended without a grpc-status"),
])
def test_a_response_that_is_not_grpc_is_an_error(headers: list[tuple[bytes, bytes]],
                                                 final: list[tuple[bytes, bytes]] | None, code: StatusCode,
                                                 message: str) -> None:
    error = response_status(headers, final)
    assert error is not None and error.code == code and message in error.details
