"""Hammer one lab path with new connections and profile both agents: ``python -m bench.connprofile``.

The connection workload of ``python -m bench`` (connect, ``--size`` bytes each way, close), on the ``ambit``
or ``ambit-svc`` path of an ``ambit lab`` made for the run (or, to compare, ``hbone``: the tunnel library alone
between the same nodes, or ``envoy``: the Envoy pair), repeated ``--rounds`` times. Each round prints
connections/s and the proxy CPU per connection of each agent; with ``--profile DIR``, py-spy samples both
agents during the rounds (``DIR/client.txt``, ``DIR/server.txt``, collapsed stacks) and the functions that
took the most samples (self and inclusive) are printed per agent. ``--tool cprofile`` profiles them with cProfile
instead, during the rounds only (``hbone.profiling``; the ``ambit`` and ``hbone`` paths): every call counted,
printed per connection, and ``--against DIR`` prints what each function costs more or less per connection than
in an earlier run's profiles (an agent's against ``python -m hbone``'s: what the agent adds to the tunnel). Root
only (the lab needs it).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import pstats
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from agent.lab import control
from agent.lab import runtime as rt
from bench.harness import Config, Receiver, conn_once, machine_cpu, nearest_rank
from bench.lab import BenchLab, LabAmbitPath, LabAmbitServicePath, LabEnvoyPath, LabHbonePath, bench_lab
from bench.paths import BenchPath, MeshCerts, Running
from bench.procs import CLOCK_TICKS, descendants
from hbone.profiling import ENV

PATHS: dict[str, Callable[[BenchLab], BenchPath]] = {
    "ambit": LabAmbitPath, "ambit-svc": LabAmbitServicePath,
    "hbone": lambda lab: LabHbonePath(lab, MeshCerts.create()),  # the tunnel library alone, for comparison
    "envoy": lambda lab: LabEnvoyPath(lab, MeshCerts.create())}


@contextlib.contextmanager
def sampled(proxies: dict[str, int], out: Path | None, rate: int, tool_name: str = "py-spy",
            native: bool = False) -> Iterator[None]:
    """A profiler on every proxy while the block runs (nothing when ``out`` is None): py-spy (Python frames,
    ``out/<role>.txt``), perf (native and kernel frames, ``out/<role>.perf.data``) or strace (system calls
    counted, ``out/<role>.strace``)."""
    if out is None:
        yield
        return
    if tool_name == "cprofile":  # in the proxies themselves (hbone.profiling): started and stopped by signals
        for pid in proxies.values():
            os.kill(pid, signal.SIGUSR1)
        try:
            yield
        finally:
            for pid in proxies.values():
                os.kill(pid, signal.SIGUSR2)
            for role, pid in proxies.items():
                written = _wait_for(lambda pid=pid: next(out.glob(f"*-{pid}.prof"), None))  # type: ignore[misc]
                written.rename(out / f"{role}.prof")
        return
    tool = shutil.which(tool_name)
    if tool is None:
        raise SystemExit(f"{tool_name} not found on PATH")
    out.mkdir(parents=True, exist_ok=True)

    def argv(role: str, pid: int) -> list[str]:
        if tool_name == "perf":
            return [tool, "record", "-F", str(rate), "-g", "-p", str(pid), "-o", str(out / f"{role}.perf.data")]
        if tool_name == "strace":
            return [tool, "-c", "-f", "-p", str(pid), "-o", str(out / f"{role}.strace")]
        return [tool, "record", "-p", str(pid), "--rate", str(rate), "--format", "raw", "-o", str(out / f"{role}.txt"),
                *(["--native"] if native else [])]

    spies = [subprocess.Popen(argv(role, pid), stdout=subprocess.DEVNULL, stderr=(out / f"{role}.log").open("wb"))
             for role, pid in proxies.items()]
    try:
        yield
    finally:
        for spy in spies:
            spy.send_signal(signal.SIGINT)
        for spy in spies:
            try:
                spy.wait(30)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait(5)


# Leaf frames of a thread waiting in C (epoll, a condition, the ring buffer's poll): py-spy cannot always tell
# them from work, and they are not work.
IDLE_LEAVES = ("Runner.run ", "Thread.run ", "_worker ", "RingBufferReader.poll ", "Thread.wait ", "Condition.wait ")


def top(collapsed: Path, n: int) -> str:
    """The ``n`` functions with the most samples in a py-spy raw (collapsed) file, self and inclusive; samples
    of threads waiting (``IDLE_LEAVES``) are left out."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f.split(" (")[0] + " " + f.rsplit("/", 1)[-1].rstrip(")") for f in stack.split(";")]
        if frames[-1].startswith(IDLE_LEAVES):
            continue
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return "(no samples)"
    lines = [f"{total} samples of work", "self:"]
    lines += [f"  {100 * c / total:5.1f}%  {f}" for f, c in own.most_common(n)]
    lines.append("inclusive:")
    lines += [f"  {100 * c / total:5.1f}%  {f}" for f, c in inclusive.most_common(n)]
    return "\n".join(lines)


def _wait_for(find: Callable[[], Path | None], timeout: float = 30.0) -> Path:
    deadline = time.monotonic() + timeout
    while (found := find()) is None:
        if time.monotonic() > deadline:
            raise SystemExit("a proxy wrote no profile: was it started with AMBIT_CPROFILE set?")
        time.sleep(0.05)
    return found  # (renamed into place once written: whole)


NOTED = 1e-7  # seconds per connection: smaller differences are left out of ``cprofile_against``


def per_connection(profile: Path) -> dict[str, tuple[float, float]]:
    """A cProfile file's functions ("dir/file.py:function"; lines merged) -> (calls, own seconds) per connection,
    the profile's connection count read from ``connections`` beside it."""
    connections = int((profile.parent / "connections").read_text())
    out: dict[str, tuple[float, float]] = {}
    for (file, _line, name), (_prim, calls, own, _cum, _callers) in pstats.Stats(str(profile)).stats.items():  # type: ignore[attr-defined]
        key = f"{'/'.join(file.split('/')[-2:])}:{name}"
        c, t = out.get(key, (0, 0.0))
        out[key] = (c + calls, t + own)
    return {k: (c / connections, t / connections) for k, (c, t) in out.items()}


def cprofile_top(profile: Path, n: int) -> str:
    """The ``n`` functions with the most time of their own, per connection."""
    rows = sorted(per_connection(profile).items(), key=lambda kv: -kv[1][1])[:n]
    return "\n".join(f"  {1e6 * t:7.2f} us  {c:5.2f} calls  {k}" for k, (c, t) in rows)


def cprofile_against(profile: Path, earlier: Path, n: int) -> str:
    """The ``n`` functions whose own time per connection grew the most from ``earlier`` to ``profile``, and the
    ``n`` that shrank the most; the totals first."""
    a, b = per_connection(profile), per_connection(earlier)
    rows = sorted(((a.get(k, (0, 0.0))[1] - b.get(k, (0, 0.0))[1], k) for k in a.keys() | b.keys()), reverse=True)
    total_a, total_b = sum(t for _c, t in a.values()), sum(t for _c, t in b.values())
    lines = [f"  {1e6 * total_a:.0f} us per connection against {1e6 * total_b:.0f} us (cProfile's own time, "
             "its overhead included)"]
    lines += [f"  {1e6 * d:+8.2f} us  {k}" for d, k in rows[:n] if d >= NOTED]
    lines.append("  ...")
    lines += [f"  {1e6 * d:+8.2f} us  {k}" for d, k in rows[-n:] if d <= -NOTED]
    return "\n".join(lines)


@contextlib.contextmanager
def extra_agents(lab: BenchLab, workers: int) -> Iterator[dict[str, list[int]]]:
    """``workers - 1`` more agents on each of the two nodes, beside the lab's own, as an upgrade starts the next
    one (same listeners, SO_REUSEPORT: the capture's bpf_sk_assign picks a listener of the group, the kernel one
    of its members). Yields their pids by role (client: node 1, server: node 2); stops them on the way out."""
    recs: dict[str, list[rt.ProcRecord]] = {"client": [], "server": []}
    try:
        for role, node in zip(recs, lab.info.nodes[:2], strict=True):
            for w in range(1, workers):
                recs[role].append(rt.spawn(lab.paths, f"{rt.agent_proc(node.name)}-worker{w}", node.netns,
                                           control.agent_argv(lab.info, lab.paths, node)))
        control.wait_ready([r for rs in recs.values() for r in rs], rt.AGENT_READY, 60.0)
        yield {role: [r.pid for r in rs] for role, rs in recs.items()}
    finally:
        rt.stop([r for rs in recs.values() for r in rs], 10.0)


def user_system(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of ``pid`` and its descendants (all threads)."""
    user = system = 0
    for p in descendants(pid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            f = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
            user, system = user + int(f[11]), system + int(f[12])
    return user / CLOCK_TICKS, system / CLOCK_TICKS


def threads(pid: int) -> dict[str, float]:
    """CPU seconds of each thread of ``pid``, by thread name (the main thread "main"; others "<name>:<tid>",
    Python not naming its threads for the system)."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = (task / "stat").read_text()
            name = "main" if task.name == str(pid) else f"{stat[stat.index('(') + 1:stat.rindex(')')]}:{task.name}"
            f = stat.rpartition(")")[2].split()
            out[name] = out.get(name, 0.0) + (int(f[11]) + int(f[12])) / CLOCK_TICKS
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.connprofile", description=__doc__.split("\n\n")[0])
    p.add_argument("--path", choices=sorted(PATHS), default="ambit")
    p.add_argument("--clients", type=int, default=1)
    p.add_argument("--count", type=int, default=2000, help="connections per round")
    p.add_argument("--size", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--profile", type=Path, help="profile both proxies (see --tool); what the tool writes goes here")
    p.add_argument("--rate", type=int, default=500, help="samples per second")
    p.add_argument("--tool", choices=("py-spy", "perf", "strace", "cprofile"), default="py-spy",
                   help="py-spy: Python frames (the process paused at each sample: the rates are not comparable); "
                        "perf: native and kernel frames; strace: system calls counted; cprofile: every Python call "
                        "counted, in the proxies (ambit and hbone paths)")
    p.add_argument("--against", type=Path, metavar="DIR",
                   help="with --tool cprofile: an earlier run's --profile DIR, to print the difference per function")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--workers", type=int, default=1,
                   help="agents per node sharing the listeners (SO_REUSEPORT); the extra ones start like an upgrade's")
    p.add_argument("--native", action="store_true", help="py-spy: native frames too (C extensions)")
    p.add_argument("--figures", type=Path, metavar="FILE",
                   help="also write the run's figures (rate, CPU, set-up p50 and p99) here, as JSON (bench.connab)")
    p.add_argument("--agent-flag", action="append", default=[], metavar="FLAG",
                   help="added to the agents' command lines (repeatable), e.g. --agent-flag=--no-telemetry")
    args = p.parse_args(argv)
    if args.tool == "cprofile":
        if args.profile is None or args.path not in ("ambit", "ambit-svc", "hbone"):
            p.error("--tool cprofile needs --profile DIR and an ambit or hbone path")
        args.profile.mkdir(parents=True, exist_ok=True)
        os.environ[ENV] = str(args.profile.absolute())  # the proxies started from here inherit it
        (args.profile / "connections").write_text(str(args.rounds * args.count))
    workdir = Path(tempfile.mkdtemp(prefix="ambit-connprofile-"))
    cfg = Config(bulk_bytes=0, runs=0, rr_count=0, rr_size=0, rr_warmup=0, rr_runs=0, workdir=workdir,
                 conn_count=args.count, conn_runs=args.rounds, conn_size=args.size)
    with bench_lab(workdir / "lab-logs", lambda s: print(s, file=sys.stderr), agent_flags=args.agent_flag) as lab:
        path = PATHS[args.path](lab)
        receiver = Receiver(workdir, path.receiver)
        try:
            with extra_agents(lab, args.workers) as extra, path.start(receiver.addr, workdir) as running:
                run(running, cfg, args, extra)
        finally:
            receiver.stop()
    if args.profile is not None and args.tool == "py-spy":
        for role in ("client", "server"):
            print(f"\n== {role} agent ==\n{top(args.profile / f'{role}.txt', args.top)}")
    if args.profile is not None and args.tool == "cprofile":
        for role in ("client", "server"):
            print(f"\n== {role}: own time per connection ==\n{cprofile_top(args.profile / f'{role}.prof', args.top)}")
            if args.against is not None:
                print(f"== {role}: against {args.against} ==\n"
                      f"{cprofile_against(args.profile / f'{role}.prof', args.against / f'{role}.prof', args.top)}")
    print(f"(logs in {workdir})")
    return 0


@dataclass(frozen=True)
class Figures:
    """What a run comes to (``--figures``, read by ``bench.connab``): connections/s (the median round), proxy CPU
    per connection over all rounds (client + server, us), set-up p50 and p99 (us, the median round's)."""

    per_second: float
    cpu_us: float
    p50_us: float
    p99_us: float

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))

    @classmethod
    def read(cls, path: Path) -> Figures:
        return cls(**json.loads(path.read_text()))


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def run(running: Running, cfg: Config, args: argparse.Namespace, extra: dict[str, list[int]]) -> None:
    rates, cpu, load_client, machine = [], collections.Counter[str](), 0.0, 0.0
    p50s: list[float] = []
    p99s: list[float] = []
    split = {role: user_system(pid) for role, pid in running.proxies.items()}
    by_thread = {role: threads(pid) for role, pid in running.proxies.items()}
    workers = {f"{role}-worker{i + 1}": pid for role, pids in extra.items() for i, pid in enumerate(pids)}
    worker_cpu = {name: sum(user_system(pid)) for name, pid in workers.items()}
    with sampled(running.proxies, args.profile, args.rate, args.tool, args.native):
        for i in range(args.rounds):
            busy0 = machine_cpu()[0]
            r = conn_once(running, cfg, args.clients, cfg.workdir / f"conn-{i}.log")
            machine += machine_cpu()[0] - busy0
            load_client += r.client_cpu
            rates.append(r.per_second)
            cpu.update({role: s for role, s in r.proxy_cpu.items()})
            p50s.append(nearest_rank(r.setup_ns, 50) / 1e3)
            p99s.append(nearest_rank(r.setup_ns, 99) / 1e3)
            per = " + ".join(f"{role} {1e6 * s / r.connections:.0f}" for role, s in sorted(r.proxy_cpu.items()))
            print(f"round {i + 1}: {r.connections} connections, {r.per_second:.0f}/s, failed {r.failed}, set-up p50 "
                  f"{p50s[-1]:.0f} us, p99 {p99s[-1]:.0f} us; proxy CPU us/connection: {per}", flush=True)
    n = args.rounds * args.count
    for role, pid in sorted(running.proxies.items()):
        (u0, s0), (u1, s1) = split[role], user_system(pid)
        print(f"{role}: user {1e6 * (u1 - u0) / n:.0f} us + system {1e6 * (s1 - s0) / n:.0f} us per connection")
        before, after = by_thread[role], threads(pid)
        print("  by thread, us per connection: " + ", ".join(
            f"{name} {1e6 * (cpu - before.get(name, 0.0)) / n:.0f}" for name, cpu in sorted(after.items())
            if cpu - before.get(name, 0.0) > 0))
    for name, pid in workers.items():
        print(f"{name}: {1e6 * (sum(user_system(pid)) - worker_cpu[name]) / n:.0f} us per connection")
    print(f"whole machine: {1e6 * machine / n:.0f} us busy per connection (the load client's own "
          f"{1e6 * load_client / n:.0f} us; the kernel's work for the pods and the server, and anything else running,"
          " in the rest)")
    print(f"median {_median(rates):.0f} connections/s; proxy CPU us/connection over all rounds: "
          + " + ".join(f"{role} {1e6 * s / n:.0f}" for role, s in sorted(cpu.items()))
          + (" (first agents only)" if workers else ""))
    if args.figures is not None:
        Figures(_median(rates), 1e6 * sum(cpu.values()) / n, _median(p50s), _median(p99s)).write(args.figures)


if __name__ == "__main__":
    sys.exit(main())
