"""Reading a BPF ring buffer (BPF_MAP_TYPE_RINGBUF) by mmap, as libbpf's ring_buffer__consume does.

Layout (kernel/bpf/ringbuf.c): page 0 holds the consumer position (we write it); page 1 the producer position
(read only); then the data area, mapped twice in a row so that a record that wraps reads as one piece. Each
record has an 8-byte header: its length with a BUSY (still being written) and a DISCARD bit, then the
payload, rounded up to 8 bytes. epoll on the map's fd tells when records arrive.
"""

from __future__ import annotations

import mmap
import select
import struct
from collections.abc import Callable

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

    def consume(self, deliver: Callable[[bytes], None]) -> int:
        """Hand every complete record to ``deliver``; returns how many."""
        cons = _U64.unpack_from(self._consumer, 0)[0]
        prod = _U64.unpack_from(self._producer, 0)[0]
        count = 0
        while cons < prod:
            at = self._data + (cons & self._mask)
            length = _U32.unpack_from(self._producer, at)[0]
            if length & _BUSY:
                break
            size = length & ~(_BUSY | _DISCARD)
            if not length & _DISCARD:
                deliver(self._producer[at + _HEADER:at + _HEADER + size])
                count += 1
            cons += (size + _HEADER + 7) & ~7
            _U64.pack_into(self._consumer, 0, cons)  # frees the space for the producer
            prod = _U64.unpack_from(self._producer, 0)[0]
        return count

    def poll(self, timeout_ms: int, deliver: Callable[[bytes], None]) -> int:
        """Wait up to ``timeout_ms`` for records (none waiting), then consume them."""
        count = self.consume(deliver)
        if count:
            return count
        self._epoll.poll(timeout_ms / 1000)
        return self.consume(deliver)

    def close(self) -> None:
        self._epoll.close()
        self._consumer.close()
        self._producer.close()
