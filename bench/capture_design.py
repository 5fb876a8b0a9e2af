"""Measurements behind the capture design (run as root: `python -m bench.capture_design`).

Each experiment builds its own lab (agent.lab) and removes it; tcx pins go to a private bpffs mounted
for the run. Results are printed as a table; the module docstring of agent/capture/redirector.py quotes
one run.
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from agent.capture import Redirector, bpfsys, netns
from agent.capture.attach import Backend
from agent.capture.maps import Listener
from agent.capture.programs import DOOR_PROG, POD_PROG
from agent.lab import Lab, Pod
from bench.capture_probe import EchoServer, TransparentRelay, exchange, private_bpffs

SINK = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(8); print("ready", flush=True)
while True:
    c, _ = s.accept(); n = 0
    buf = bytearray(1 << 20)
    while (k := c.recv_into(buf)):
        n += k
    c.sendall(b"x"); c.close()
"""
SOURCE = r"""
import socket, sys, time
total = int(sys.argv[3]); chunk = b"\0" * (1 << 20)
s = socket.create_connection((sys.argv[1], int(sys.argv[2]))); print("connected", flush=True)
sys.stdin.readline()  # go: the caller may enroll the receiver meanwhile (the connection stays uncaptured)
t0 = time.perf_counter(); sent = 0
while sent < total:
    s.sendall(chunk); sent += len(chunk)
s.shutdown(socket.SHUT_WR); s.recv(1); print(time.perf_counter() - t0, flush=True)
"""

def _us(values: list[float]) -> str:
    values = sorted(values)
    p99 = values[min(len(values) - 1, int(len(values) * 0.99))]
    return f"median {statistics.median(values) * 1e6:8.1f} us  p99 {p99 * 1e6:8.1f} us  (n={len(values)})"


def _connect_times(pod: Pod, ip: str, port: int, n: int, source_port: int = 0, payload: bool = False) -> list[float]:
    out = []
    for _ in range(n):
        with netns.entered(pod.netns):
            s = socket.socket()
        with s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if source_port:
                s.bind(("0.0.0.0", source_port))
            s.settimeout(5)
            t0 = time.perf_counter()
            s.connect((ip, port))
            out.append(time.perf_counter() - t0)
            if payload:  # the server closes first, so does the relay: TIME_WAIT on the node, not in the pod
                while s.recv(4096):
                    pass
    return out


def exp_connect(bpffs: str, n: int) -> list[str]:
    """Connection set-up time: direct vs tc sk_assign vs hybrid (tc marks, SK_LOOKUP selects)."""
    rows = []
    with Lab.up(2, 1) as lab:
        a, c = lab.pods
        node = lab.nodes[0]
        with EchoServer(c.netns):
            rows.append("direct (no capture)        " + _us(_connect_times(a, c.ip, 8080, n)))
            for label, selects in (("tc sk_assign  ", False), ("hybrid SK_LOOKUP", True)):
                r = Redirector(["eth0"], netns=node.netns, bpffs=bpffs, lookup_selects=selects).start()
                try:
                    with TransparentRelay(node.netns, ports=(15001,)) as relay:
                        r.register_listener(Listener.OUTBOUND, relay.listeners[15001])
                        r.enroll(a.ip, a.host_ifname)
                        times = _connect_times(a, c.ip, 8080, n)
                        assert relay.accepted, "nothing captured"
                        rows.append(f"captured, {label}   " + _us(times))
                finally:
                    r.close()
    return rows


def exp_time_wait(bpffs: str, n: int) -> list[str]:
    """A client reusing its source port while the proxy-side socket of the last connection is in TIME_WAIT."""
    rows = []
    with Lab.up(2, 1) as lab:
        a, c = lab.pods
        node = lab.nodes[0]
        with EchoServer(c.netns, greet_only=True):
            for label, register in (("tc only (kernel TW path)", False), ("tc + SK_LOOKUP listener", True)):
                r = Redirector(["eth0"], netns=node.netns, bpffs=bpffs).start()
                try:
                    with TransparentRelay(node.netns, ports=(15001,)) as relay:
                        if register:
                            r.register_listener(Listener.OUTBOUND, relay.listeners[15001])
                        r.enroll(a.ip, a.host_ifname)
                        port = 40000 + (1 if register else 0)
                        times = _connect_times(a, c.ip, 8080, n, source_port=port, payload=True)
                        tw = lab.exec(node.netns, ["ss", "-Htan", "state", "time-wait"]).stdout.count("\n")
                        slow = sum(t > 0.005 for t in times[1:])
                        rows.append(f"{label:26s} {_us(times[1:])}  >5ms: {slow}/{len(times) - 1}  TW on node: {tw}")
                finally:
                    r.close()
    return rows


def _throughput(lab: Lab, src: Pod, dst_ip: str, size: int, before_go: Callable[[], None] = lambda: None) -> float:
    """Gbit/s of one bulk transfer src -> dst_ip:5201; `before_go` runs once the connection is open."""
    proc = lab.popen(src.netns, [sys.executable, "-c", SOURCE, dst_ip, "5201", str(size)],
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        assert proc.stdout.readline().strip() == "connected"
        before_go()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        return size * 8 / float(proc.stdout.readline()) / 1e9
    finally:
        proc.kill()
        proc.wait()


def exp_hook_cost(bpffs: str, size: int, rounds: int) -> list[str]:
    """Bulk traffic a -> b (same node) with b ENROLLED over a connection opened just BEFORE b's enrollment, which
    therefore stays uncaptured while every one of its packets takes the full per-packet path: b's ACKs that of
    b's veth ingress (source verification, socket lookup miss, flow-table miss), a's data that of b's door
    (socket lookup miss, flow-table miss). Nothing vs clsact vs tcx, interleaved round by round (this VM's
    throughput drifts with other load), plus each program's own run time per invocation."""
    stats_fd = bpfsys.enable_stats()
    progs = (POD_PROG, DOOR_PROG)
    try:
        with Lab.up(1, 2) as lab:
            a, b = lab.pods
            node = lab.nodes[0]
            sink = lab.popen(b.netns, [sys.executable, "-c", SINK, "5201"], stdout=subprocess.PIPE)
            backends: tuple[Backend, ...] = ("clsact", "tcx")
            agents = {be: Redirector(["eth0"], netns=node.netns, bpffs=bpffs, backend=be).start() for be in backends}
            gbit: dict[str, list[float]] = {"none": [], "clsact": [], "tcx": []}
            ns_per_run: dict[tuple[str, str], list[float]] = {(be, p): [] for be in backends for p in progs}
            try:
                assert sink.stdout is not None
                sink.stdout.readline()
                for _ in range(rounds):
                    gbit["none"].append(_throughput(lab, a, b.ip, size))
                    for be, r in agents.items():
                        before = {p: bpfsys.prog_info(r.prog_fd(p)) for p in progs}
                        enroll = functools.partial(r.enroll, b.ip, b.host_ifname)
                        gbit[be].append(_throughput(lab, a, b.ip, size, enroll))
                        after = {p: bpfsys.prog_info(r.prog_fd(p)) for p in progs}
                        r.release(b.ip)
                        for p in progs:
                            runs = max(after[p].run_cnt - before[p].run_cnt, 1)
                            ns_per_run[be, p].append((after[p].run_time_ns - before[p].run_time_ns) / runs)
            finally:
                sink.kill()
                sink.wait()
                for r in agents.values():
                    r.close()
    finally:
        os.close(stats_fd)
    rows = []
    for label, values in gbit.items():
        cost = "".join(f"   {p} {statistics.median(ns_per_run[label, p]):4.0f} ns/run"
                       for p in progs if (label, p) in ns_per_run)
        rows.append(
            f"{label:6s} median {statistics.median(values):5.1f} Gbit/s  (min {min(values):5.1f}, "
            f"max {max(values):5.1f}, {len(values)} rounds){cost}"
        )
    return rows


def _agent_child(
    node_ns: str, pod_ip: str, ifname: str, backend: Backend, bpffs: str, keep_pins: bool, conn: Connection
) -> None:
    r = Redirector(["eth0"], bpffs=bpffs, backend=backend).start()
    r.enroll(pod_ip, ifname)
    held: list[int] = []
    if backend == "tcx" and not keep_pins:  # links held only by this process's fds
        for att in r.attachments():
            held.append(bpfsys.obj_get(att.ident))
            os.unlink(att.ident)
    relay = TransparentRelay(None, ports=(15001,)).start()
    conn.send("ready")
    signal.pause()
    relay.close()


def _outcome(a: Pod, c: Pod) -> str:
    """captured (the relay's upstream used another source port), direct, or failed."""
    try:
        (_ip, port), reply = exchange(a.netns, c.ip, 8080, timeout=1.0)
    except OSError as e:
        return f"connection failed ({type(e).__name__})"
    if reply.startswith(f"peer={a.ip}:{port} ".encode()):
        return "went through DIRECTLY"
    return "captured by the relay" if reply.startswith(f"peer={a.ip}:".encode()) else f"reply {reply!r}"


def exp_agent_death(bpffs: str) -> list[str]:
    """What enrolled pods get after `kill -9` of the agent, per attachment kind."""
    import multiprocessing

    rows = []
    variants: list[tuple[str, Backend, bool]] = [
        ("clsact filter", "clsact", True), ("tcx link, pinned", "tcx", True), ("tcx link, not pinned", "tcx", False),
    ]  # fmt: skip
    with Lab.up(2, 1) as lab:
        a, c = lab.pods
        node = lab.nodes[0]
        with EchoServer(c.netns):
            for label, backend, keep in variants:
                parent, child = multiprocessing.Pipe()
                proc = netns.start_process(
                    node.netns, _agent_child, node.netns, a.ip, a.host_ifname, backend, bpffs, keep, child
                )
                try:
                    assert parent.poll(30), "agent child did not start"
                    parent.recv()
                    alive = _outcome(a, c)
                    os.kill(proc.pid or 0, signal.SIGKILL)
                    proc.join(5)
                    dead = _outcome(a, c)
                    rows.append(f"{label:22s} agent up: {alive:36s} after kill -9: {dead}")
                finally:
                    if proc.is_alive():
                        os.kill(proc.pid or 0, signal.SIGKILL)
                        proc.join(5)
                    cleanup = Redirector(["eth0"], netns=node.netns, bpffs=bpffs).start()
                    cleanup.reconcile({})
                    cleanup.close()
    return rows


CNI_STANDIN = b"""
#include <uapi/linux/pkt_cls.h>
int cni_ingress(struct __sk_buff *skb) { return TC_ACT_OK; }
"""


def exp_other_tcx_program(bpffs: str) -> list[str]:
    """Another tool's tcx program on the pod's veth (as a CNI using tcx would have) that returns TC_ACT_OK."""
    from bcc import BPF

    rows = []
    cni = BPF(text=CNI_STANDIN)
    cni_fd = cni.load_func(b"cni_ingress", BPF.SCHED_CLS).fd
    with Lab.up(2, 1) as lab:
        a, c = lab.pods
        node = lab.nodes[0]
        with EchoServer(c.netns):
            backends: tuple[Backend, ...] = ("clsact", "tcx")
            for backend in backends:
                with netns.entered(node.netns):
                    ix = socket.if_nametoindex(a.host_ifname)
                    cni_link = bpfsys.link_create_tcx(cni_fd, ix, first=False)
                r = Redirector(["eth0"], netns=node.netns, bpffs=bpffs, backend=backend).start()
                try:
                    with TransparentRelay(node.netns, ports=(15001,)):
                        r.enroll(a.ip, a.host_ifname)
                        outcomes = {_outcome(a, c) for _ in range(3)}
                        with netns.entered(node.netns):
                            chain = [bpfsys.prog_info_by_id(pid).name for pid, _l in bpfsys.tcx_query(ix)]
                        rows.append(f"{backend:6s}: tcx chain {chain}: enrolled pod's connection {sorted(outcomes)}")
                finally:
                    r.close()
                    bpfsys.link_detach(cni_link)
                    os.close(cni_link)
    cni.cleanup()
    return rows


def exp_attach_cost(bpffs: str, pods: int) -> list[str]:
    """enroll() latency and reconcile() after a restart, per backend."""
    rows = []
    with Lab.up(1, pods) as lab:
        node = lab.nodes[0]
        desired = {p.ip: p.host_ifname for p in lab.pods}
        backends: tuple[Backend, ...] = ("clsact", "tcx")
        for backend in backends:
            t0 = time.perf_counter()
            r = Redirector(["eth0"], netns=node.netns, bpffs=bpffs, backend=backend).start()
            t_start = time.perf_counter() - t0
            t0 = time.perf_counter()
            for p in lab.pods:
                r.enroll(p.ip, p.host_ifname)
            t_enroll = (time.perf_counter() - t0) / pods
            r.close(detach=False)  # like a crash: attachments stay
            r2 = Redirector(["eth0"], netns=node.netns, bpffs=bpffs, backend=backend).start()
            t0 = time.perf_counter()
            r2.reconcile(desired)
            t_rec = time.perf_counter() - t0
            n_att = len(r2.attachments())
            r2.close()
            rows.append(
                f"{backend:6s} start (compile+load) {t_start * 1e3:6.0f} ms  enroll {t_enroll * 1e3:5.2f} ms/pod  "
                f"reconcile {pods} pods after restart {t_rec * 1e3:6.1f} ms  attachments {n_att} (= {pods}+1)"
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run all experiments and print their results."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--only", metavar="WORD", help="only the experiments whose title contains WORD")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root", file=sys.stderr)
        return 2
    n = 100 if args.quick else 500
    experiments: list[tuple[str, Callable[[str], list[str]]]] = [
        ("connection set-up, pod -> pod on another node", lambda d: exp_connect(d, n)),
        ("source-port reuse over a proxy-side TIME_WAIT", lambda d: exp_time_wait(d, 30 if args.quick else 100)),
        (
            "bulk a -> b on one node over a connection older than b's enrollment (full path, uncaptured; 256 MiB)",
            lambda d: exp_hook_cost(d, 256 << 20, 3 if args.quick else 7),
        ),
        ("agent killed (kill -9)", exp_agent_death),
        ("another tool's tcx program returning TC_ACT_OK on the pod veth", exp_other_tcx_program),
        ("attach cost", lambda d: exp_attach_cost(d, 20)),
    ]
    results: dict[str, Any] = {}
    with private_bpffs() as bpffs:
        for title, fn in experiments:
            if args.only and args.only not in title:
                continue
            print(f"== {title}", flush=True)
            rows = fn(bpffs)
            results[title] = rows
            for row in rows:
                print("   " + row, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
