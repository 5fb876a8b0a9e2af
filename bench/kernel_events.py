"""``python -m bench.kernel_events``: what one eBPF event costs the agent's event loop, and what reading it costs.

The events of 2,048 connections (a SYN and a FIN each, some RSTs and fail-closed drops, a tenth IPv6) from 200
enrolled client pods to 100 servers fill a ring laid out as the kernel's BPF ring buffer (8-byte headers,
8-byte alignment, the consumer position written back), here in anonymous memory: a BPF ring buffer only a BPF
program can write. Timed, per event:

* on the loop: ``RingBufferReader.read`` in chunks of 256, handed to ``FlowRecorder.kernel_records`` (the
  node glue's ``KernelEvents``, the metrics, the flow ring of the agent's default size) as the agent's
  ``KernelReader`` does;
* when read: the flows built by a ring snapshot (what ``ambit observe`` pays, once per event).

It waits (30 s at most) for other processes to leave the CPUs alone; the median of the runs is printed, with
the range and how busy other processes kept the CPUs meanwhile.
"""

from __future__ import annotations

import mmap
import statistics
import struct
import sys
import time

from agent.capture.maps import EventType, FlowEvent, Hook, Reason, Verdict
from agent.capture.ringbuf import RingBufferReader
from agent.node.kernel_events import KernelEvents
from agent.telemetry.metrics import Metrics
from agent.telemetry.recorder import Endpoint, FlowRecorder
from bench.harness import LoadMeter, wait_until_quiet

CONNECTIONS = 2048
CLIENTS, SERVERS = 200, 100
CHUNK = 256
RUNS = 15
_HEADER = struct.Struct("=II")  # a record's length (BUSY and DISCARD bits clear), and the kernel's padding
_POSITION = struct.Struct("=Q")


def events() -> list[bytes]:
    out = []
    for i in range(CONNECTIONS):
        v6 = i % 10 == 0
        src = f"fd00:1::{i % CLIENTS + 1:x}" if v6 else f"10.1.{i % CLIENTS // 250}.{i % CLIENTS % 250 + 1}"
        dst = f"fd00:2::{i % SERVERS + 1:x}" if v6 else f"10.2.0.{i % SERVERS + 1}"
        sport, ts = 30000 + i % 30000, 1_000_000_000 + i * 1000
        out.append(FlowEvent(ts, src, sport, dst, 8080, 7, EventType.SYN, 0x02, Hook.POD, Verdict.REDIRECTED, 15001,
                             Reason.NONE).to_bytes())
        if i % 50 == 0:  # a fail-closed drop
            out.append(FlowEvent(ts, dst, 8080, src, sport, 3, EventType.DROP, 0x12, Hook.UPLINK, Verdict.DROPPED, 0,
                                 Reason.NO_LISTENER).to_bytes())
        end, flags = (EventType.RST, 0x14) if i % 20 == 0 else (EventType.FIN, 0x11)
        out.append(FlowEvent(ts + 500, src, sport, dst, 8080, 7, end, flags, Hook.POD, Verdict.REDIRECTED, 15001,
                             Reason.NONE).to_bytes())
    return out


class MemoryRing(RingBufferReader):
    """The kernel ring buffer's layout in anonymous memory, filled here instead of by a BPF program."""

    def __init__(self, records: list[bytes]) -> None:  # (not RingBufferReader's: there is no map to mmap)
        self.fd, self.size = -1, 1 << max(12, (len(records) * 64 - 1).bit_length())
        self._mask = self.size - 1
        page = mmap.PAGESIZE
        self._consumer = mmap.mmap(-1, page)
        self._producer = mmap.mmap(-1, page + 2 * self.size)
        self._data = page
        self._records = records

    def fill(self) -> None:
        at = 0
        for r in self._records:
            _HEADER.pack_into(self._producer, self._data + at, len(r), 0)
            self._producer[self._data + at + 8:self._data + at + 8 + len(r)] = r
            at += (len(r) + 15) & ~7
        _POSITION.pack_into(self._producer, 0, at)
        _POSITION.pack_into(self._consumer, 0, 0)

    def read_events(self, limit: int) -> list[bytes]:  # capture.Redirector's, without its lock
        return self.read(limit)

    @property
    def events_fd(self) -> int:
        return self.fd

    @property
    def lost_events(self) -> int:
        return 0


def resolver() -> dict[str, Endpoint]:
    known = {}
    for i in range(CLIENTS):
        for ip in (f"10.1.{i // 250}.{i % 250 + 1}", f"fd00:1::{i + 1:x}"):
            known[ip] = Endpoint(ip, 0, f"spiffe://cluster.local/ns/shop/sa/client-{i}", "shop", f"client-{i}",
                                 {"app": f"client-{i}", "version": "v1"}, f"client-{i}")
    return known


def main() -> int:
    records = events()
    ring = MemoryRing(records)
    source = KernelEvents(ring)
    known = resolver()
    recorder = FlowRecorder("bench-node", 4096, Metrics(), resolve=known.get)
    on_loop, on_read = [], []
    wait_until_quiet(30)
    meter = LoadMeter()
    for run in range(RUNS + 1):
        ring.fill()
        start = time.perf_counter()
        while batch := ring.read(CHUNK):
            recorder.kernel_records(source, batch)
        drained = time.perf_counter()
        flows = len(recorder.ring.snapshot().entries)
        done = time.perf_counter()
        if run:  # the first run warms the caches (kinds, addresses, metric series)
            on_loop.append((drained - start) / len(records) * 1e6)
            on_read.append((done - drained) / flows * 1e6)
    background = meter.stop()
    print(f"kernel events: {statistics.median(on_loop):.2f} us each on the event loop (ring read + recorded; range "
          f"{min(on_loop):.2f}-{max(on_loop):.2f}), {statistics.median(on_read):.2f} us each when read (flow built; "
          f"range {min(on_read):.2f}-{max(on_read):.2f}); {len(records):,} events x {RUNS} runs, chunks of {CHUNK}; "
          f"other processes {background.other:.0%} of the CPUs, steal {background.steal:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
