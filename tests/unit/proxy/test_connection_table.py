"""The connection table's entries: a closed connection leaves nothing behind for the garbage collector."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import pytest

from agent.proxy.connections import ConnectionTable, Proxied
from agent.proxy.splice import Splice
from hbone import Relay


def _relay_closes(relay: Relay) -> None:
    relay.finish("closed")


def _splice_closes(splice: Splice) -> None:
    """Its sides' connections are lost, one after the other, as their transports report it."""
    splice.client.connection_lost(None)
    assert not splice.upstream.lost and splice.client.peer is splice.upstream  # (links kept while a side lives)
    splice.upstream.connection_lost(None)


@pytest.mark.parametrize(("make", "close"), [(Relay, _relay_closes), (Splice, _splice_closes)],
                         ids=["relay", "splice"])
def test_a_closed_connection_is_freed_by_reference_counting(no_collector: None, make: Callable[[], Proxied],
                                                            close: Callable[[Any], None]) -> None:
    """The table's entry is the connection's close handler and holds its abort: were the connection to keep the
    handler once closed, the two would wait for the collector (every connection, ~10 objects, its transport
    among them, and collector passes of 0.5-3 ms on the agent's loop). A splice's sides and the splice refer to
    each other too, until both sides are lost."""
    table = ConnectionTable()
    conn = make()
    table.watch("inbound-hbone", ("10.0.0.1",), conn)
    assert table.count() == 1
    gone = weakref.ref(conn)
    close(conn)
    assert table.count() == 0 and conn.on_close is None
    del conn
    assert gone() is None
