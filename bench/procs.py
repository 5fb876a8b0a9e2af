"""Child processes for the benchmark and the interop tests: started so they die with us, stopped for sure.

Every child gets PR_SET_PDEATHSIG=SIGKILL, so it dies if the Python process that started it dies, even by
SIGKILL (a launcher sets it and then execs the program, so the pid is the program's), and its own session,
so a signal to the child's group does not reach us. ``Child.stop`` sends SIGTERM, waits a bounded time,
then SIGKILLs the group. Output goes to a log file, never to a pipe we might forget to drain, unless the
caller asks for a stdout pipe to read a readiness line."""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

_PR_SET_PDEATHSIG = 1
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class ChildError(RuntimeError):
    """A child process that failed to start or to become ready; the message carries its log tail."""


# PR_SET_PDEATHSIG survives execve, so a launcher can set it and exec the real program (keeping the pid).
# util-linux's setpriv does exactly that; without it, a Python one-liner does (a preexec_fn would be simpler
# but is unsafe in a process with threads, and the tests run target servers in threads).
_PY_LAUNCHER = ("import ctypes, os, signal, sys; "
                f"ctypes.CDLL(None).prctl({_PR_SET_PDEATHSIG}, signal.SIGKILL, 0, 0, 0); "
                "os.execvp(sys.argv[1], sys.argv[1:])")


def _die_with_parent(argv: Sequence[str]) -> list[str]:
    setpriv = shutil.which("setpriv")
    if setpriv:
        return [setpriv, "--pdeathsig", "KILL", "--", *argv]
    return [sys.executable, "-c", _PY_LAUNCHER, *argv]


def log_tail(path: Path, max_bytes: int = 6000) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError as e:
        return f"(no log at {path}: {e})"
    text = data.decode(errors="replace")
    return ("...\n" if size > max_bytes else "") + text


@dataclass
class Child:
    """A running child process with its log file."""

    name: str
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes]
    _stdout_buf: bytes = field(default=b"", repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def describe_failure(self, what: str) -> str:
        rc = self.proc.poll()
        state = "still running" if rc is None else f"exited with status {rc}"
        return (f"{self.name}: {what} ({state})\ncommand: {' '.join(self.argv)}\n"
                f"--- {self.log_path} ---\n{log_tail(self.log_path)}")

    def read_line(self, timeout: float) -> str | None:
        """Next line of the child's stdout (children started with ``stdout_pipe`` only); None on EOF."""
        assert self.proc.stdout is not None, "child was started without a stdout pipe"
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._stdout_buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(self.describe_failure(f"no output line within {timeout:.1f}s"))
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                if self._stdout_buf:
                    line, self._stdout_buf = self._stdout_buf, b""
                    return line.decode(errors="replace")
                return None
            self._stdout_buf += chunk
        line, _, self._stdout_buf = self._stdout_buf.partition(b"\n")
        return line.decode(errors="replace")

    def wait_for_line(self, prefix: str, timeout: float) -> str:
        """Read stdout lines until one starts with ``prefix``; returns the rest of that line."""
        deadline = time.monotonic() + timeout
        for _ in range(10_000):
            left = deadline - time.monotonic()
            line = self.read_line(max(left, 0.0))
            if line is None:
                raise ChildError(self.describe_failure(f"closed stdout before printing {prefix!r}"))
            with open(self.log_path, "a") as log:  # keep what we consumed in the log too
                log.write(f"[stdout] {line}\n")
            if line.startswith(prefix):
                return line[len(prefix):].strip()
        raise ChildError(self.describe_failure(f"too many lines without {prefix!r}"))

    def stop(self, grace: float = 3.0) -> int:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL the child's process group; the exit status."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(grace)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group: also any helpers the child started
        rc = self.proc.wait(5.0)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return rc


def spawn(name: str, argv: Sequence[str], log_path: Path, *, stdout_pipe: bool = False,
          env: dict[str, str] | None = None, cwd: Path | None = None) -> Child:
    """Start ``argv`` with stderr (and stdout unless ``stdout_pipe``) appended to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            _die_with_parent(argv), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else log, stderr=log,
            env=env, cwd=cwd, start_new_session=True,
        )
    return Child(name, list(argv), log_path, proc)


@contextlib.contextmanager
def running(child: Child) -> Iterator[Child]:
    try:
        yield child
    finally:
        child.stop()


def python_env() -> dict[str, str]:
    """Environment for Python children: unbuffered output, the project root importable."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def wait_accepting(addr: tuple[str, int], timeout: float, child: Child | None = None) -> None:
    """Until a TCP connect to ``addr`` succeeds (the connection is closed at once, without data)."""
    deadline = time.monotonic() + timeout
    last: OSError | None = None
    for _ in range(max(1, int(timeout / 0.02) + 1)):
        if child is not None and not child.alive():
            raise ChildError(child.describe_failure(f"died before {addr[0]}:{addr[1]} accepted"))
        try:
            with socket.create_connection(addr, timeout=1.0):
                return
        except OSError as e:
            last = e
        if time.monotonic() >= deadline:
            break
        time.sleep(0.02)
    msg = f"{addr[0]}:{addr[1]} did not accept within {timeout:.1f}s: {last}"
    raise ChildError(child.describe_failure(msg) if child else msg)


def _stat_fields(pid: int) -> list[str]:
    data = Path(f"/proc/{pid}/stat").read_text()
    # comm (field 2) may hold spaces and parentheses: split after its closing parenthesis
    return data[data.rindex(")") + 2:].split()


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        return _stat_fields(pid)[0] not in ("Z", "X")
    except (OSError, ValueError, IndexError):
        return False


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (a bounded scan of /proc)."""
    parent_of: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            parent_of[int(entry.name)] = int(_stat_fields(int(entry.name))[1])
    found = [pid]
    for _ in range(64):  # depth bound
        more = [p for p, pp in parent_of.items() if pp in found and p not in found]
        if not more:
            break
        found.extend(more)
    return found


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime+stime of the given processes and their descendants (all threads), from /proc/<pid>/stat."""
    total = 0
    seen: set[int] = set()
    for root in pids:
        for pid in descendants(root):
            if pid in seen:
                continue
            seen.add(pid)
            with contextlib.suppress(OSError, IndexError, ValueError):
                f = _stat_fields(pid)
                total += int(f[11]) + int(f[12])  # fields 14 and 15 of stat: utime, stime
    return total / CLOCK_TICKS


@dataclass(frozen=True)
class Memory:
    """Resident (RSS) and proportional (PSS: shared pages divided among their sharers) set sizes, bytes."""

    rss: int = 0
    pss: int = 0

    def __add__(self, other: Memory) -> Memory:
        return Memory(self.rss + other.rss, self.pss + other.pss)

    def peak(self, other: Memory) -> Memory:
        """The larger of each figure."""
        return Memory(max(self.rss, other.rss), max(self.pss, other.pss))


def _rollup(pids: Sequence[int]) -> Memory:
    """RSS and PSS summed over ``pids`` from /proc/<pid>/smaps_rollup (processes gone count as nothing)."""
    total = Memory()
    for p in pids:
        fields: dict[str, int] = {}
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines()[1:]:
                key, _, value = line.partition(":")
                if key in ("Rss", "Pss"):
                    fields[key] = int(value.split()[0]) * 1024  # kB
        total += Memory(fields.get("Rss", 0), fields.get("Pss", 0))
    return total


def memory(pid: int) -> Memory:
    """RSS and PSS of ``pid`` and its descendants. PSS sums correctly over processes that share pages; RSS
    counts shared pages in each."""
    return _rollup(descendants(pid))


def memories(pids: dict[str, int]) -> dict[str, Memory]:
    """``memory`` of each process of a role -> pid map."""
    return {role: memory(pid) for role, pid in pids.items()}


class MemoryPeak:
    """The largest RSS and PSS of each process (role -> pid, with the descendants it has on entry) while the
    ``with`` block runs, read every ``interval`` s by a thread. A sample reads only those processes'
    smaps_rollup (which walks their page tables: ten times a second costs them little); the scan of /proc
    for descendants, which costs the sampler milliseconds, is done once."""

    def __init__(self, pids: dict[str, int], interval: float = 0.1) -> None:
        self.pids, self.interval = pids, interval
        self.peak: dict[str, Memory] = {}
        self._trees: dict[str, list[int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_until_stopped, daemon=True)

    def _sample(self) -> None:
        for role, tree in self._trees.items():
            self.peak[role] = self.peak.get(role, Memory()).peak(_rollup(tree))

    def _sample_until_stopped(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> MemoryPeak:
        if self.pids:
            self._trees = {role: descendants(pid) for role, pid in self.pids.items()}
            self._sample()
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pids:
            self._stop.set()
            self._thread.join()
            self._sample()
