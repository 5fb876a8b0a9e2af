"""What the HBONE protocol layer (``hbone.protocol``) reports to the I/O layer, one event per fact, in
the manner of h2's and h11's events.

Events are immutable by convention, not ``frozen``: a frozen dataclass sets each field through
``object.__setattr__``, which more than doubles the cost of making one, and a connection makes several (h2's
events are plain classes too)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from hbone.authority import Authority


@dataclass(slots=True)
class ConnectRequest:
    stream_id: int
    authority: Authority
    headers: Mapping[str, str]


@dataclass(slots=True)
class RequestRejected:
    """A request this layer answered itself (status 400); reported so the I/O layer can log it."""

    stream_id: int
    status: int
    reason: str


@dataclass(slots=True)
class ConnectResponse:
    stream_id: int
    status: int
    headers: Mapping[str, str]


@dataclass(slots=True)
class Data:
    stream_id: int
    data: bytes | memoryview  # a view of the bytes read, valid as long as it is referenced
    flow_length: int  # what to acknowledge once the data has been passed on


@dataclass(slots=True)
class StreamEnded:
    stream_id: int


@dataclass(slots=True)
class StreamReset:
    """The stream is gone: reset by the peer, or by this layer for the peer's error on that stream."""

    stream_id: int
    error_code: int
    refused: bool  # REFUSED_STREAM: the peer never processed it, the stream may be retried


@dataclass(slots=True)
class WindowOpened:
    stream_id: int  # 0: the connection window


@dataclass(slots=True)
class GoAwayReceived:
    """The peer's graceful GOAWAY (NO_ERROR): no new streams; those up to ``last_stream_id`` that this side
    opened, and every stream the peer opened, carry on to their end (RFC 9113 §6.8)."""

    last_stream_id: int
    reason: str


@dataclass(slots=True)
class ConnectionEnded:
    """The connection ended: a GOAWAY with an error received, or sent after the peer's protocol error (or
    by ``goaway``). Nothing more is received or sent; ``reason`` says why."""

    error_code: int
    reason: str
    last_stream_id: int | None = None


Event = (ConnectRequest | RequestRejected | ConnectResponse | Data | StreamEnded | StreamReset | WindowOpened
         | GoAwayReceived | ConnectionEnded)
