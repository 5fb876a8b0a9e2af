"""Give the C heap's free memory back to the kernel while the agent is idle.

``hbone.keep_buffers_on_heap`` keeps up to 32 MiB of free heap in the process so that a relay's buffers do not
fault in anew at every copy, and glibc trims a thread's heap only from its top: what start-up leaves behind (the
cluster's state parsed, a certificate fetched per identity, every pod attached) stays resident in the holes, 2-3
MiB on a node with 100 enrolled pods (measured: ``bench/agent_memory.py``).
``malloc_trim(0)`` returns the free pages of every arena; the agent calls it only when it proxies no connection,
so it never takes from a relay what it is about to use again. On a C library without it, nothing is done.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)


def _malloc_trim() -> ctypes._NamedFuncPointer | None:
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        log.info("malloc_trim unavailable: free heap memory stays with the agent")
        return None
    fn.argtypes = (ctypes.c_size_t,)
    fn.restype = ctypes.c_int
    return fn


_TRIM = _malloc_trim()


def trim() -> bool:
    """Return every arena's free pages to the kernel (a few ms: call it off the event loop). True if any went."""
    return bool(_TRIM(0)) if _TRIM is not None else False
