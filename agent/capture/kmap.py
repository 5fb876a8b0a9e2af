"""BPF maps through their file descriptors (bpf(2) directly): what the agent needs of bcc's tables, without bcc.

Keys and values are ctypes values (``ctypes.c_uint32``, the structures of ``maps``), as bcc's tables take
them; a per-CPU map reads as one value per possible CPU.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from typing import Any, Generic, TypeVar

from agent.capture import bpfsys

K = TypeVar("K", bound=Any)
V = TypeVar("V", bound=Any)


def possible_cpus() -> int:
    """The number of possible CPUs, which sizes per-CPU map values (not the online count)."""
    with open("/sys/devices/system/cpu/possible") as f:
        text = f.read().strip()
    count = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        count += int(hi or lo) - int(lo) + 1
    return count


class KernelMap(Generic[K, V]):
    """A BPF map the agent holds open by fd."""

    def __init__(self, fd: int, key_type: type[K], value_type: type[V], percpu: bool = False) -> None:
        info = bpfsys.map_info(fd)
        if info.key_size != ctypes.sizeof(key_type) or info.value_size != ctypes.sizeof(value_type):
            raise ValueError(f"map {info.name!r}: key/value sizes {info.key_size}/{info.value_size} are not "
                             f"{ctypes.sizeof(key_type)}/{ctypes.sizeof(value_type)}")
        self.fd, self.info = fd, info
        self.key_type, self.value_type = key_type, value_type
        self._cpus = possible_cpus() if percpu else 0
        self._stride = (info.value_size + 7) & ~7

    def __setitem__(self, key: K, value: V) -> None:
        bpfsys.map_update(self.fd, bytes(key), bytes(value))

    def __delitem__(self, key: K) -> None:
        try:
            bpfsys.map_delete(self.fd, bytes(key))
        except FileNotFoundError:
            raise KeyError(key) from None

    def get(self, key: K) -> V | None:
        raw = bpfsys.map_lookup(self.fd, bytes(key), self.info.value_size)
        return None if raw is None else self.value_type.from_buffer_copy(raw)

    def per_cpu(self, key: K) -> list[V]:
        """A per-CPU map's values for ``key``, one per possible CPU."""
        raw = bpfsys.map_lookup(self.fd, bytes(key), self._stride * self._cpus)
        if raw is None:
            raise KeyError(key)
        return [self.value_type.from_buffer_copy(raw, i * self._stride) for i in range(self._cpus)]

    def keys(self) -> Iterator[K]:
        key: bytes | None = None
        for _ in range(self.info.max_entries + 1):  # bounded: a map never holds more
            key = bpfsys.map_next_key(self.fd, key, self.info.key_size)
            if key is None:
                return
            yield self.key_type.from_buffer_copy(key)

    def items(self) -> Iterator[tuple[K, V]]:
        for key in list(self.keys()):
            value = self.get(key)
            if value is not None:
                yield key, value

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
