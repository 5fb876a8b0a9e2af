"""Reading a BPF ring buffer (BPF_MAP_TYPE_RINGBUF) by mmap, as libbpf's ring_buffer__consume does.

Layout (kernel/bpf/ringbuf.c): page 0 holds the consumer position (we write it); page 1 the producer position
(read only); then the data area, mapped twice in a row so that a record that wraps reads as one piece. Each
record has an 8-byte header: its length with a BUSY (still being written) and a DISCARD bit, then the
payload, rounded up to 8 bytes.

The map's fd is pollable, level-triggered: readable while the consumer position is behind the producer's
(``fd`` for an event loop's reader, or ``poll`` here). The kernel wakes a waiting reader only when a record
lands where the consumer stands (it had caught up), so a reader that stops watching while records gather and
watches again finds the fd readable at once: nothing waits unseen.
"""

from __future__ import annotations

import mmap
import select
import struct

from agent.capture import bpfsys

_BUSY = 1 << 31
_DISCARD = 1 << 30
_HEADER = 8
_U64 = struct.Struct("=Q")
_U32 = struct.Struct("=I")


class RingBufferReader:
    def __init__(self, fd: int) -> None:
        info = bpfsys.map_info(fd)
        self.fd, self.size = fd, info.max_entries
        self._mask = self.size - 1
        page = mmap.PAGESIZE
        self._consumer = mmap.mmap(fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._producer = mmap.mmap(fd, page + 2 * self.size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        self._data = page  # offset of the data area in the producer mapping
        self._epoll = select.epoll()
        self._epoll.register(fd, select.EPOLLIN)

    def read(self, limit: int) -> list[bytes]:
        """Up to ``limit`` complete records, oldest first; their space goes back to the producer at once. Fewer
        than ``limit`` means none was complete past them (more may arrive any time)."""
        producer, data, mask, unpack = self._producer, self._data, self._mask, _U32.unpack_from
        cons = _U64.unpack_from(self._consumer, 0)[0]
        prod = _U64.unpack_from(producer, 0)[0]
        out: list[bytes] = []
        while cons < prod and len(out) < limit:
            at = data + (cons & mask)
            length = unpack(producer, at)[0]
            if length & _BUSY:  # still being written: it and what follows are read next time
                break
            size = length & ~(_BUSY | _DISCARD)
            if not length & _DISCARD:
                out.append(producer[at + _HEADER:at + _HEADER + size])
            cons += (size + _HEADER + 7) & ~7
        _U64.pack_into(self._consumer, 0, cons)  # frees the space for the producer
        return out

    def poll(self, timeout_ms: int, limit: int = 1 << 20) -> list[bytes]:
        """Records waiting now, else those that arrive within ``timeout_ms``."""
        records = self.read(limit)
        if records:
            return records
        self._epoll.poll(timeout_ms / 1000)
        return self.read(limit)

    def close(self) -> None:
        self._epoll.close()
        self._consumer.close()
        self._producer.close()
