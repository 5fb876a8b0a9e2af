"""The connection table's entries: a closed connection leaves nothing behind for the garbage collector."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from agent.proxy.connections import ConnectionTable, Proxied
from agent.proxy.splice import Splice
from hbone import Relay


@pytest.fixture
def no_collector() -> Iterator[None]:
    """Only reference counting frees objects meanwhile: what a cycle holds stays."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.mark.parametrize("make", [Relay, Splice], ids=["relay", "splice"])
def test_a_closed_connection_is_freed_by_reference_counting(no_collector: None, make: type[Proxied]) -> None:
    """The table's entry is the connection's close handler and holds its abort: were the connection to keep the
    handler once closed, the two would wait for the collector (every connection, ~10 objects, its transport
    among them, and collector passes of 0.5-3 ms on the agent's loop)."""
    table = ConnectionTable()
    conn = make()
    table.watch("inbound-hbone", ("10.0.0.1",), conn)
    assert table.count() == 1
    gone = weakref.ref(conn)
    conn.finish("closed")  # type: ignore[attr-defined]
    assert table.count() == 0 and conn.on_close is None
    del conn
    assert gone() is None
