"""How long to wait before trying again what failed: exponential back-off with jitter, the one retry policy of
the parts that keep reconnecting (the Kubernetes informers, the certificate manager). Each states its own
numbers; none of this does I/O or draws random numbers itself, so a test can pin every delay."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    """``initial * factor**(n-1)`` after the n-th failure in a row, capped at ``cap``, minus up to ``jitter`` of it
    (clients that failed together do not all come back at the same moment)."""

    initial: float
    cap: float
    factor: float = 2.0
    jitter: float = 0.2

    def delay(self, failures: int, rand: float) -> float:
        """Seconds to wait after the ``failures``-th consecutive failure (1 = the first); ``rand``, uniform in
        [0, 1) (``random.random()``), picks how much jitter takes off."""
        base = min(self.cap, self.initial * self.factor ** min(max(failures - 1, 0), 64))
        return base * (1.0 - self.jitter * rand)
