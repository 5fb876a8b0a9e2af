"""``python -m bench.door_cost``: what each capture program costs per run (BPF_ENABLE_STATS) while bulk traffic
flows into an enrolled pod: iperf3 into app-1-2 (enrolled) from app-2-1 (another node: the uplink) and from
app-1-1 (the same node: the client's veth), through the agents of a lab made for the run and removed after it.
The door (``ambit_pod_egress``) runs on every packet into the pod. Needs root. Prints a table; asserts nothing."""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import time

from agent.capture import bpfsys
from agent.lab import control
from agent.lab import state as lab_state
from agent.lab.runtime import LabInfo, LabPaths

Stats = dict[str, tuple[int, int]]  # program name -> (runs, ns)


def _stats(names: set[str]) -> Stats:
    out: Stats = {}
    for pid in bpfsys.prog_ids():
        info = bpfsys.prog_info_by_id(pid)
        if info.name in names:
            runs, ns = out.get(info.name, (0, 0))
            out[info.name] = (runs + info.run_cnt, ns + info.run_time_ns)
    return out


def _iperf(info: LabInfo, server: str, client: str, size: str) -> None:
    srv, cli = (next(p for p in info.pods if p.name == n) for n in (server, client))
    with subprocess.Popen(["ip", "netns", "exec", srv.netns, "iperf3", "-s", "-1", "-p", "5201"],
                          stdout=subprocess.DEVNULL) as sink:
        time.sleep(0.5)
        subprocess.run(["ip", "netns", "exec", cli.netns, "iperf3", "-c", srv.ip, "-p", "5201", "-n", size, "-l", "1M"],
                       stdout=subprocess.DEVNULL, check=True, timeout=120)
        sink.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", default="512M", help="iperf3 -n per client (default %(default)s)")
    args = ap.parse_args()
    name = f"doorcost-{secrets.token_hex(3)}"
    names = {p[:15] for p in ("ambit_pod_ingress", "ambit_uplink_ingress", "ambit_pod_egress", "ambit_sk_lookup")}
    stats_fd = bpfsys.enable_stats()
    try:
        info = control.up(name, nodes=2, pods=2, namespaces=("default", "shop"), timeout=120)
        paths = LabPaths.of(name)
        with lab_state.edit(paths.state) as st:
            st.label("Namespace", "", "shop", [("istio.io/dataplane-mode", "ambient")], overwrite=True)
        time.sleep(2)
        before = _stats(names)
        for client in ("app-2-1", "app-1-1"):
            _iperf(info, "app-1-2", client, args.size)
        after = _stats(names)
    finally:
        os.close(stats_fd)
        control.down(name, timeout=5)
    print(f"{'program':22s} {'runs':>9s} {'ns/run':>7s}")
    for prog in sorted(after):
        runs = after[prog][0] - before.get(prog, (0, 0))[0]
        ns = after[prog][1] - before.get(prog, (0, 0))[1]
        print(f"{prog:22s} {runs:9d} {ns / max(runs, 1):7.0f}")


if __name__ == "__main__":
    main()
