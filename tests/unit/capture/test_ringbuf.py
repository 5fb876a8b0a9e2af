"""RingBufferReader.read over the kernel's ring-buffer layout (in anonymous memory: only a BPF program writes a real
one; tests/e2e/test_capture.py reads the real one): records in order, at most ``limit`` per read, a discarded
record skipped, a record still being written (BUSY) and all after it left for the next read, the consumer
position written back so the producer gets the space."""

from __future__ import annotations

import struct

from bench.kernel_events import MemoryRing

_BUSY, _DISCARD = 1 << 31, 1 << 30


def records(n: int) -> list[bytes]:
    return [bytes([i]) * (8 + i % 13) for i in range(n)]  # lengths not multiples of 8: padding is skipped


def set_header_bits(ring: MemoryRing, index: int, bits: int) -> None:
    at = ring._data + sum((len(r) + 15) & ~7 for r in ring._records[:index])
    length = struct.unpack_from("=I", ring._producer, at)[0]
    struct.pack_into("=I", ring._producer, at, length | bits)


def consumer(ring: MemoryRing) -> int:
    return int(struct.unpack_from("=Q", ring._consumer, 0)[0])


def test_records_come_in_order_at_most_limit_per_read_and_their_space_is_given_back() -> None:
    want = records(20)
    ring = MemoryRing(want)
    ring.fill()
    got = [ring.read(8), ring.read(8), ring.read(8), ring.read(8)]
    assert [len(g) for g in got] == [8, 8, 4, 0]
    assert [r for g in got for r in g] == want
    assert consumer(ring) == sum((len(r) + 15) & ~7 for r in want)


def test_a_discarded_record_is_skipped_and_a_busy_one_waits_with_all_after_it() -> None:
    want = records(6)
    ring = MemoryRing(want)
    ring.fill()
    set_header_bits(ring, 1, _DISCARD)
    set_header_bits(ring, 3, _BUSY)
    assert ring.read(100) == [want[0], want[2]]
    assert ring.read(100) == []  # still busy
    at = ring._data + sum((len(r) + 15) & ~7 for r in want[:3])
    struct.pack_into("=I", ring._producer, at, len(want[3]))  # the kernel committed it
    assert ring.read(100) == want[3:]
