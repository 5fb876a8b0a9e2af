"""``python -m bench.enforcement``: time from a policy change to its enforcement, in a lab.

Two nodes, one pod each, the namespace enrolled. Each round writes a DENY AuthorizationPolicy for the
client into the lab's state (as `ambit lab apply` does), then probes from the client pod until a
connection is refused; then deletes the policy and probes until one is let through again. The figure is
the time from just before the state file is written to the first probe with the new outcome (probes every
10 ms, so it over-reads by up to that). Needs root.
"""

from __future__ import annotations

import os
import secrets
import statistics
import subprocess
import sys
import time
from typing import Any

from agent.capture import netns
from agent.lab import control
from agent.lab.runtime import LabInfo, LabPaths, python
from agent.lab.state import edit
from agent.mesh.store import AMBIENT, DATAPLANE_MODE

ROUNDS = 10
PORT = 8080
SERVER = f"""
import socket
s = socket.create_server(("0.0.0.0", {PORT}), backlog=512)
while True:
    c, _ = s.accept()
    c.sendall(b"ok")
    c.close()
"""
# The probe runs in the client pod, started before the change: once told T0 (stdin) it connects and reads
# until the outcome is the wanted one ("refused" = reset or EOF without the answer); prints ms since T0.
PROBE = """
import socket, sys, time
want = sys.argv[1]
print("ready", flush=True)
t0 = float(sys.stdin.readline())
deadline = time.time() + 10
while time.time() < deadline:
    try:
        s = socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=2)
        got = "allowed" if s.recv(2) == b"ok" else "refused"
        s.close()
    except OSError:
        got = "refused"
    if got == want:
        print((time.time() - t0) * 1000)
        sys.exit(0)
    time.sleep(0.01)
sys.exit(1)
"""


def deny(client_sa: str, namespace: str) -> dict[str, Any]:
    return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "bench-deny", "namespace": namespace},
            "spec": {"action": "DENY", "rules": [{"from": [{"source": {
                "principals": [f"cluster.local/ns/{namespace}/sa/{client_sa}"]}}]}]}}


def measure(info: LabInfo, paths: LabPaths) -> tuple[list[float], list[float]]:
    client, server = info.pods[0], info.pods[1]
    to_deny: list[float] = []
    to_allow: list[float] = []
    for _ in range(ROUNDS):
        for policy_on, out in ((True, to_deny), (False, to_allow)):
            want = "refused" if policy_on else "allowed"
            probe = netns.popen(client.netns, [python(), "-c", PROBE, want, server.ip, str(PORT)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert probe.stdin is not None and probe.stdout is not None
            try:
                probe.stdout.readline()  # "ready": the interpreter is up before the clock starts
                t0 = time.time()
                with edit(paths.state) as state:
                    if policy_on:
                        state.put(deny(client.service_account, client.namespace))
                    else:
                        state.remove("AuthorizationPolicy", client.namespace, "bench-deny")
                probe.stdin.write(f"{t0!r}\n")
                probe.stdin.flush()
                answer, _ = probe.communicate(timeout=30)
            finally:
                probe.kill()
            if probe.returncode != 0:
                raise RuntimeError(f"policy {'applied' if policy_on else 'deleted'}: never {want} within 10 s")
            out.append(float(answer.strip()))
    return to_deny, to_allow


def _figure(samples: list[float]) -> str:
    return f"median {statistics.median(samples):.0f} ms, max {max(samples):.0f} ms"


def main() -> int:
    if os.geteuid() != 0:
        print("bench.enforcement: needs root (a lab of network namespaces); skipped", file=sys.stderr)
        return 0
    name = f"benchpol{secrets.token_hex(2)}"
    try:
        info = control.up(name, nodes=2, pods=1)
        paths = LabPaths.of(name)
        with edit(paths.state) as state:
            state.label("Namespace", "", info.pods[0].namespace, [(DATAPLANE_MODE, AMBIENT)], overwrite=True)
        server = netns.popen(info.pods[1].netns, [python(), "-c", SERVER])
        try:
            time.sleep(1.0)
            to_deny, to_allow = measure(info, paths)
        finally:
            server.terminate()
            server.wait(5)
    finally:
        control.down(name)
    print(f"enforcement: policy applied -> first refused connection: {_figure(to_deny)}; "
          f"policy deleted -> first allowed connection: {_figure(to_allow)} ({ROUNDS} rounds each; "
          f"probes every 10 ms; target under 1 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
