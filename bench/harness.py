"""The benchmark run: a receiver where each path wants one, every path started in front of its receiver,
every workload through each path, the senders in the namespace the path names.

Runs are interleaved across paths (run 1 of every path, then run 2, ...) so a drift of the machine
(another tenant, thermal state) spreads over all paths instead of biasing one. The proxies' memory is read
when the paths are up (idle), again after the bulk and request/response workloads, and continuously
during the concurrent connection runs (the peak).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from agent.capture.netns import netns_argv
from agent.mesh.model import Address
from bench import procs
from bench.paths import BenchPath, Place, Running
from bench.procs import (
    Child,
    ChildError,
    Memory,
    MemoryPeak,
    cpu_seconds,
    memories,
    parse_hostport,
    pid_alive,
    python_env,
    spawn,
)

GIB = 1 << 30
ROOT = Path(__file__).resolve().parent.parent


def machine_cpu() -> tuple[float, float]:
    """Busy and stolen CPU seconds of the whole machine so far, summed over CPUs (from /proc/stat)."""
    f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = f[:8]
    return (user + nice + system + irq + softirq) / procs.CLOCK_TICKS, steal / procs.CLOCK_TICKS


def _our_cpu() -> float:
    """CPU seconds of this process, its live descendants and its reaped children."""
    t = os.times()
    return cpu_seconds([os.getpid()]) + t.children_user + t.children_system


@dataclass
class Background:
    """What the rest of the machine did during a run, as fractions of all CPUs (other test suites, the
    hypervisor taking time away): a check on whether a run can be trusted."""

    other: float = 0.0
    steal: float = 0.0


class LoadMeter:
    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.busy0, self.steal0 = machine_cpu()
        self.ours0 = _our_cpu()

    def stop(self) -> Background:
        wall = max(time.monotonic() - self.t0, 1e-6) * len(os.sched_getaffinity(0))
        busy, steal = machine_cpu()
        other = (busy - self.busy0) - (_our_cpu() - self.ours0)
        return Background(max(0.0, other) / wall, (steal - self.steal0) / wall)


def wait_until_quiet(max_wait: float, threshold: float = 0.10, quiet_seconds: int = 3,
                     say: Callable[[str], None] = print) -> float:
    """Wait (at most ``max_wait`` s) until other processes use under ``threshold`` of all CPUs for
    ``quiet_seconds`` consecutive seconds. Returns the last one-second load seen."""
    deadline = time.monotonic() + max_wait
    quiet = 0
    load = 1.0
    for i in range(int(max_wait) + quiet_seconds + 1):
        meter = LoadMeter()
        time.sleep(1.0)
        load = meter.stop().other
        quiet = quiet + 1 if load < threshold else 0
        if quiet >= quiet_seconds:
            return load
        if time.monotonic() >= deadline:
            break
        if i % 10 == 0:
            say(f"waiting for a quiet machine: other processes use {load:.0%} of the CPUs")
    say(f"machine still busy after {max_wait:.0f}s (other processes use {load:.0%}); measuring anyway")
    return load


@dataclass
class BulkRun:
    nbytes: int
    seconds: float
    proxy_cpu: dict[str, float]  # role -> CPU seconds used during the run
    background: Background = field(default_factory=Background)

    @property
    def gbit_per_s(self) -> float:
        return self.nbytes * 8 / self.seconds / 1e9


@dataclass
class RrRun:
    samples_ns: list[int]
    proxy_cpu: dict[str, float]  # over the measured and the warm-up exchanges
    warmup: int
    background: Background = field(default_factory=Background)

    @property
    def exchanges(self) -> int:
        return len(self.samples_ns) + self.warmup


@dataclass
class ConnRun:
    """One run of the connection workload: ``clients`` clients making connections at once."""

    clients: int
    setup_ns: list[int]  # set-up latency of each connection that succeeded
    seconds: float  # wall time from the first connect to the last close
    proxy_cpu: dict[str, float]
    client_cpu: float  # CPU seconds of the load client over ``seconds``
    failed: int = 0
    errors: list[str] = field(default_factory=list)  # the first few failures, as the client saw them
    peak_memory: dict[str, Memory] = field(default_factory=dict)  # role -> the largest seen during the run
    background: Background = field(default_factory=Background)

    @property
    def connections(self) -> int:
        return len(self.setup_ns)

    @property
    def per_second(self) -> float:
        return self.connections / self.seconds


# Phases at which the proxies' memory is read.
IDLE = "idle"  # the paths are up, no workload has run
AFTER = "after bulk and rr"  # idle again, after the bulk and request/response workloads
UNDER_LOAD = "under load"  # the peak during the concurrent connection runs


def nearest_rank(samples: Sequence[int], q: float) -> int:
    """The ``q``-th percentile of ``samples`` by nearest rank."""
    s = sorted(samples)
    return s[min(len(s), max(1, math.ceil(q / 100 * len(s)))) - 1]


@dataclass
class PathResult:
    name: str
    description: str
    bulk: list[BulkRun] = field(default_factory=list)
    rr: list[RrRun] = field(default_factory=list)
    conn: list[ConnRun] = field(default_factory=list)
    memory: dict[str, dict[str, Memory]] = field(default_factory=dict)  # phase -> proxy role -> memory
    discarded: int = 0  # runs measured again because other processes loaded the machine

    def gbit_median(self) -> float:
        return statistics.median(r.gbit_per_s for r in self.bulk)

    def cpu_per_gib(self) -> dict[str, float]:
        """Median over runs of proxy CPU seconds per GiB moved, by role and in total."""
        if not self.bulk:
            return {}
        roles = sorted({k for r in self.bulk for k in r.proxy_cpu})
        out = {role: statistics.median(r.proxy_cpu.get(role, 0.0) / (r.nbytes / GIB) for r in self.bulk)
               for role in roles}
        if roles:
            out["total"] = statistics.median(sum(r.proxy_cpu.values()) / (r.nbytes / GIB) for r in self.bulk)
        return out

    def run_percentiles_us(self, q: float) -> list[float]:
        """The ``q``-th percentile (nearest rank) of each rr run, in microseconds."""
        return [nearest_rank(r.samples_ns, q) / 1000 for r in self.rr]

    def percentile_us(self, q: float) -> float:
        """Median over rr runs of the runs' ``q``-th percentiles: one disturbed run does not decide it."""
        return statistics.median(self.run_percentiles_us(q))

    def cpu_us_per_exchange(self) -> float:
        n = sum(r.exchanges for r in self.rr)
        return sum(sum(r.proxy_cpu.values()) for r in self.rr) * 1e6 / n if n else 0.0

    def conn_runs(self, clients: int) -> list[ConnRun]:
        return [r for r in self.conn if r.clients == clients]

    def conn_rate(self, clients: int) -> float:
        """Median over runs of connections per second with ``clients`` clients."""
        return statistics.median(r.per_second for r in self.conn_runs(clients))

    def setup_us(self, clients: int, q: float) -> float:
        """Median over runs of each run's ``q``-th percentile of set-up latency, in microseconds."""
        return statistics.median(nearest_rank(r.setup_ns, q) / 1000 for r in self.conn_runs(clients))

    def cpu_us_per_conn(self, clients: int) -> dict[str, float]:
        """Proxy CPU microseconds per connection (all runs with ``clients`` clients), by role and in total."""
        runs = self.conn_runs(clients)
        n = sum(r.connections + r.failed for r in runs)
        roles = sorted({k for r in runs for k in r.proxy_cpu})
        if not n or not roles:
            return {}
        out = {role: sum(r.proxy_cpu.get(role, 0.0) for r in runs) * 1e6 / n for role in roles}
        out["total"] = sum(out.values())
        return out

    def client_cpu_share(self, clients: int) -> float:
        """The load client's CPU time over wall time (1.0: one CPU busy), over all runs with ``clients``."""
        runs = self.conn_runs(clients)
        return sum(r.client_cpu for r in runs) / sum(r.seconds for r in runs)

    def peak_memory(self) -> dict[str, Memory]:
        """The largest memory of each proxy seen during the concurrent connection runs."""
        out: dict[str, Memory] = {}
        for r in self.conn:
            for role, m in r.peak_memory.items():
                out[role] = out.get(role, Memory()).peak(m)
        return out


@dataclass
class Config:
    bulk_bytes: int
    runs: int
    rr_count: int
    rr_size: int
    rr_warmup: int
    rr_runs: int
    workdir: Path
    max_other_load: float = 1.0  # a run during which other processes used more is measured again
    retries: int = 0  # at most this many times per run
    quiet_wait: float = 60.0  # before measuring again, wait at most this long for a quiet machine
    conn_count: int = 2000  # connections per connection run
    conn_clients: int = 50  # clients at once in the concurrent connection runs (the others: one)
    conn_runs: int = 0  # connection runs per path and mode; 0: no connection workload
    conn_size: int = 100  # bytes each way on every connection


class Receiver:
    """The ``bench.load receiver`` process at a place and the result lines it prints for bulk connections."""

    def __init__(self, workdir: Path, place: Place, log_name: str = "receiver.log") -> None:
        argv = [sys.executable, "-m", "bench.load", "receiver", "--listen", f"{place.host}:0"]
        self.child = spawn("receiver", netns_argv(place.netns, argv), workdir / log_name, stdout_pipe=True,
                           env=python_env(), cwd=ROOT)
        try:
            self.addr: Address = parse_hostport(self.child.wait_for_line("listening on", 15.0))
        except BaseException:
            self.child.stop()
            raise

    def result(self, tag: str, timeout: float) -> dict[str, float]:
        deadline = time.monotonic() + timeout
        for _ in range(1000):
            line = self.child.read_line(max(0.0, deadline - time.monotonic()))
            if line is None:
                raise ChildError(self.child.describe_failure("receiver stopped"))
            rec = json.loads(line)
            if rec.get("tag") == tag:
                return {k: float(v) for k, v in rec.items() if k != "tag"}
        raise ChildError(self.child.describe_failure(f"no result for tag {tag}"))

    def stop(self) -> None:
        self.child.stop()


def _run_client(name: str, args: Sequence[str], log: Path, timeout: float,
                netns: str | None = None) -> dict[str, object]:
    argv = netns_argv(netns, [sys.executable, "-m", "bench.load", *args])
    child: Child = spawn(name, argv, log, stdout_pipe=True, env=python_env(), cwd=ROOT)
    try:
        line = child.read_line(timeout)
        if line is None:
            raise ChildError(child.describe_failure("exited without a result"))
        out: dict[str, object] = json.loads(line)
        try:
            rc = child.proc.wait(10.0)
        except subprocess.TimeoutExpired:
            raise ChildError(child.describe_failure("printed its result but did not exit")) from None
        if rc != 0:
            raise ChildError(child.describe_failure(f"printed its result but exited with {rc}"))
        return out
    finally:
        child.stop()


def _cpu(proxies: dict[str, int]) -> dict[str, float]:
    return {role: cpu_seconds([pid]) for role, pid in proxies.items()}


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after}


def _check_alive(name: str, running: Running, cfg: Config) -> None:
    dead = [f"{role} (pid {pid})" for role, pid in running.proxies.items() if not pid_alive(pid)]
    if dead:
        raise ChildError(f"path {name}: {', '.join(dead)} exited; logs in {cfg.workdir / name}")


def bulk_once(running: Running, receiver: Receiver, cfg: Config, log: Path) -> BulkRun:
    tag = os.urandom(8).hex()
    # generous: 20 MB/s is far below any path's worst case
    timeout = 60.0 + cfg.bulk_bytes / 20e6
    before = _cpu(running.proxies)
    meter = LoadMeter()
    sent = _run_client("bulk", ["bulk", "--connect", f"{running.entry[0]}:{running.entry[1]}",
                                "--bytes", str(cfg.bulk_bytes), "--tag", tag], log, timeout,
                       running.client_netns)
    got = receiver.result(tag, timeout)
    background = meter.stop()
    after = _cpu(running.proxies)
    if int(got["bytes"]) != int(str(sent["bytes"])):
        raise ChildError(f"receiver got {int(got['bytes'])} bytes, sender sent {sent['bytes']}")
    seconds = got["t_eof"] - float(str(sent["t_first_send"]))
    return BulkRun(int(got["bytes"]), seconds, _delta(after, before), background)


def rr_once(running: Running, cfg: Config, log: Path) -> RrRun:
    timeout = 60.0 + (cfg.rr_count + cfg.rr_warmup) * 0.005
    before = _cpu(running.proxies)
    meter = LoadMeter()
    out = _run_client("rr", ["rr", "--connect", f"{running.entry[0]}:{running.entry[1]}",
                             "--count", str(cfg.rr_count), "--size", str(cfg.rr_size),
                             "--warmup", str(cfg.rr_warmup)], log, timeout, running.client_netns)
    background = meter.stop()
    after = _cpu(running.proxies)
    samples = out["samples_ns"]
    assert isinstance(samples, list)
    return RrRun([int(s) for s in samples], _delta(after, before), cfg.rr_warmup, background)


def conn_once(running: Running, cfg: Config, clients: int, log: Path) -> ConnRun:
    """One connection run; with several clients, the proxies' memory is sampled while it runs."""
    timeout = 60.0 + cfg.conn_count * 0.02  # 50 connections/s: far below any path's worst case
    before = _cpu(running.proxies)
    meter = LoadMeter()
    with MemoryPeak(running.proxies if clients > 1 else {}) as peak:
        out = _run_client("conn", ["conn", "--connect", f"{running.entry[0]}:{running.entry[1]}",
                                   "--count", str(cfg.conn_count), "--clients", str(clients),
                                   "--size", str(cfg.conn_size)], log, timeout, running.client_netns)
    background = meter.stop()
    after = _cpu(running.proxies)
    samples, errors = out["setup_ns"], out["errors"]
    assert isinstance(samples, list) and isinstance(errors, list)
    failed = int(str(out["failed"]))
    if not samples:
        raise ChildError(f"all {failed} connections to {running.entry[0]}:{running.entry[1]} failed: "
                         f"{'; '.join(map(str, errors))}")
    return ConnRun(clients, [int(x) for x in samples], float(str(out["seconds"])), _delta(after, before),
                   float(str(out["cpu_seconds"])), failed, [str(e) for e in errors], peak.peak, background)


@contextlib.contextmanager
def kept_unless_done(workdir: Path, keep: bool, say: Callable[[str], None]) -> Iterator[None]:
    """``workdir`` (configs, certificates, logs) removed when the block ends well, unless ``keep``; else kept,
    and said where."""
    done = False
    try:
        yield
        done = True
    finally:
        if done and not keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            say(f"configs, certificates and logs kept in {workdir}")


@contextlib.contextmanager
def receivers(paths: Sequence[BenchPath], workdir: Path) -> Iterator[dict[Place, Receiver]]:
    """One receiver per distinct place the paths name, stopped on exit."""
    with contextlib.ExitStack() as stack:
        out: dict[Place, Receiver] = {}
        for place in dict.fromkeys(p.receiver for p in paths):
            log = "receiver.log" if not out else f"receiver-{len(out) + 1}.log"
            out[place] = rx = Receiver(workdir, place, log)
            stack.callback(rx.stop)
        yield out


@contextlib.contextmanager
def started(paths: Sequence[BenchPath], targets: dict[Place, Receiver],
            workdir: Path) -> Iterator[dict[str, Running]]:
    with contextlib.ExitStack() as stack:
        running: dict[str, Running] = {}
        for p in paths:
            running[p.name] = stack.enter_context(p.start(targets[p.receiver].addr, workdir / p.name))
        yield running


_Run = TypeVar("_Run", BulkRun, RrRun, ConnRun)


def _measured(measure: Callable[[], _Run], name: str, running: Running, cfg: Config, result: PathResult,
              say: Callable[[str], None]) -> _Run:
    """One run; measured again (at most ``cfg.retries`` times, after waiting for a quiet machine) while
    other processes used more than ``cfg.max_other_load`` of the CPUs during it."""
    for attempt in range(cfg.retries + 1):
        _check_alive(name, running, cfg)
        r = measure()
        if r.background.other <= cfg.max_other_load or attempt == cfg.retries:
            return r
        result.discarded += 1
        say(f"[{name}] other processes used {r.background.other:.0%} of the CPUs during the run: "
            f"measuring it again ({attempt + 1}/{cfg.retries})")
        wait_until_quiet(cfg.quiet_wait, say=say)
    raise AssertionError("unreachable")


def run(paths: Sequence[BenchPath], cfg: Config, progress: bool = True) -> list[PathResult]:
    def say(msg: str) -> None:
        if progress:
            print(msg, file=sys.stderr, flush=True)

    results = {p.name: PathResult(p.name, p.description) for p in paths}
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    with receivers(paths, cfg.workdir) as rx, started(paths, rx, cfg.workdir) as running:
        for p in paths:
            r = running[p.name]
            pids = ", ".join(f"{role} pid {pid}" for role, pid in r.proxies.items()) or "no proxies"
            where = f", senders in {r.client_netns}" if r.client_netns else ""
            say(f"[{p.name}] entry {r.entry[0]}:{r.entry[1]} ({pids}{where}); "
                f"receiver {rx[p.receiver].addr[0]}:{rx[p.receiver].addr[1]}")
            results[p.name].memory[IDLE] = memories(r.proxies)
        for i in range(cfg.runs):
            for p in paths:
                log = cfg.workdir / "bulk.log"
                bulk = functools.partial(bulk_once, running[p.name], rx[p.receiver], cfg, log)
                b = _measured(bulk, p.name, running[p.name], cfg, results[p.name], say)
                results[p.name].bulk.append(b)
                cpu = sum(b.proxy_cpu.values())
                say(f"[{p.name}] bulk run {i + 1}/{cfg.runs}: {b.nbytes / GIB:.2f} GiB in "
                    f"{b.seconds:.2f}s = {b.gbit_per_s:.2f} Gbit/s, proxy CPU {cpu:.2f}s; "
                    f"other load {b.background.other:.0%}, steal {b.background.steal:.0%}")
        for i in range(cfg.rr_runs):
            for p in paths:
                rr = functools.partial(rr_once, running[p.name], cfg, cfg.workdir / "rr.log")
                q = _measured(rr, p.name, running[p.name], cfg, results[p.name], say)
                results[p.name].rr.append(q)
                s = sorted(q.samples_ns)
                say(f"[{p.name}] rr run {i + 1}/{cfg.rr_runs}: {len(s)} exchanges, "
                    f"p50 {s[len(s) // 2] / 1000:.1f} us, p99 {s[int(len(s) * 0.99)] / 1000:.1f} us; "
                    f"other load {q.background.other:.0%}, steal {q.background.steal:.0%}")
        for p in paths:
            results[p.name].memory[AFTER] = memories(running[p.name].proxies)
        for i in range(cfg.conn_runs):
            for clients in (1, cfg.conn_clients):
                for p in paths:
                    conn = functools.partial(conn_once, running[p.name], cfg, clients, cfg.workdir / "conn.log")
                    c = _measured(conn, p.name, running[p.name], cfg, results[p.name], say)
                    results[p.name].conn.append(c)
                    failed = f", {c.failed} FAILED ({'; '.join(c.errors)})" if c.failed else ""
                    say(f"[{p.name}] connection run {i + 1}/{cfg.conn_runs}, {clients} client(s): "
                        f"{c.connections} connections in {c.seconds:.2f}s = {c.per_second:.0f}/s{failed}, "
                        f"set-up p50 {nearest_rank(c.setup_ns, 50) / 1000:.0f} us, "
                        f"p99 {nearest_rank(c.setup_ns, 99) / 1000:.0f} us, client CPU "
                        f"{c.client_cpu / c.seconds:.0%}; other load {c.background.other:.0%}, "
                        f"steal {c.background.steal:.0%}")
        for p in paths:
            if cfg.conn_runs:
                results[p.name].memory[UNDER_LOAD] = results[p.name].peak_memory()
    return [results[p.name] for p in paths]
