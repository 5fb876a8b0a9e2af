"""An agent upgrade (issue 16): the next agent starts beside the running one on the same ports (SO_REUSEPORT) and
adopts the node; the old one closes its listeners and drains. New connections are never refused during the
hand-over; an established connection lives on in the old agent until the drain period ends (its TCP and TLS
state cannot move between processes), then is reset.

Measured here, printed for BENCHMARKS.md: the longest wait of a new connection during the upgrade, and how long
the established connection kept working.
"""

from __future__ import annotations

import threading
import time

from agent.lab import control
from agent.lab.runtime import PodInfo
from tests.fixtures import lab_helpers as h
from tests.fixtures import lab_observe as lo

pytestmark = lo.lab_marks()


class Prober:
    """New connections one after another (bounded), each outcome and duration recorded."""

    def __init__(self, client: PodInfo, server: PodInfo) -> None:
        self.client, self.server = client, server
        self.attempts: list[tuple[float, str, float]] = []  # (started, outcome, seconds)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="probe")

    def _run(self) -> None:
        for _ in range(5000):  # bounded: ~ 60 s at most
            if self._stop.is_set():
                return
            started = time.monotonic()
            try:
                with h.Client(self.client, (self.server.ip, h.SERVER_PORT), connect_timeout=5) as c:
                    c.exchange(b"probe")
                outcome = "ok"
            except (OSError, ConnectionError) as e:
                outcome = type(e).__name__
            self.attempts.append((started, outcome, time.monotonic() - started))
            time.sleep(0.005)

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def test_new_connections_are_never_refused_during_an_upgrade() -> None:
    with h.running_lab("upgrade", nodes=2, pods=1, namespaces=("mesh",)) as (info, paths):
        client, server = info.pods
        h.set_namespace_label(paths, "mesh", "ambient")
        lo.wait_agents(paths, ["node-1", "node-2"], captured={"node-1": {client.ip}, "node-2": {server.ip}})
        echo = h.EchoServer(server).start()
        long = h.Client(client, (server.ip, h.SERVER_PORT))
        try:
            long.exchange(b"before")
            with Prober(client, server) as prober:
                time.sleep(0.3)
                upgraded = time.monotonic()
                upgrade = threading.Thread(target=control.upgrade_agents,
                                           args=(info, paths, ["node-1", "node-2"], 60.0), name="upgrade")
                upgrade.start()
                lived = 0.0
                while upgrade.is_alive():  # the old agents drain: the long connection works until they exit
                    try:
                        long.exchange(b"during")
                        lived = time.monotonic() - upgraded
                    except (OSError, ConnectionError):
                        break
                    time.sleep(0.1)
                upgrade.join(60)
                time.sleep(0.3)
        finally:
            long.close()
            echo.close()
        failed = [a for a in prober.attempts if a[1] != "ok"]
        during = [a for a in prober.attempts if a[0] >= upgraded]
        slowest = max(a[2] for a in during)
        print(f"\nupgrade of both agents: {len(during)} new connections during it, {len(failed)} failed, "
              f"slowest {slowest * 1000:.0f} ms; the established connection kept working for {lived:.1f} s "
              f"(drain period {control.DRAIN_SECONDS:g} s)")
        assert not failed, failed[:5]
        assert len(during) > 50
        assert lived > 1.0, "the established connection outlived the next agent's start"
