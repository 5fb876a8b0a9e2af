"""cProfile on request in a running process, for the connection benchmarks (``bench.connprofile --tool cprofile``).

With ``AMBIT_CPROFILE=DIR`` in its environment, a process that called ``profile_on_signals`` profiles its event
loop's thread from SIGUSR1 to SIGUSR2, then writes ``DIR/<name>-<pid>.prof`` (``pstats`` format). Deterministic,
unlike a sampler: every call is counted, so two processes doing the same work per connection (an agent and
``python -m hbone``) can be compared function by function. Without the variable nothing is installed.
"""

from __future__ import annotations

import asyncio
import cProfile
import os
import signal

ENV = "AMBIT_CPROFILE"


def profile_on_signals(loop: asyncio.AbstractEventLoop, name: str) -> None:
    """Install the SIGUSR1 (start) and SIGUSR2 (stop and write) handlers on ``loop`` when ``AMBIT_CPROFILE`` asks
    for them."""
    out = os.environ.get(ENV)
    if not out:
        return
    profiler = cProfile.Profile()

    def stop() -> None:
        profiler.disable()
        path = os.path.join(out, f"{name}-{os.getpid()}.prof")
        profiler.dump_stats(path + ".part")
        os.replace(path + ".part", path)  # whole when it appears under its name

    loop.add_signal_handler(signal.SIGUSR1, profiler.enable)
    loop.add_signal_handler(signal.SIGUSR2, stop)
