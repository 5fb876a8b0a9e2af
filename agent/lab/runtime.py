"""Where a lab lives on disk, what it records about itself, and the detached processes it runs.

Layout of a lab directory, /run/ambit/labs/<name>/::

    lab.json                topology: nodes (netns, IPs, uplink, pod CIDRs), pods (netns, IPs, node, veth
                            names, service account), every namespace made, CA address, agent flags
    state.yaml              the cluster state (agent/lab/state.py), the agents' and the CA's --state/--pods
    tokens.yaml             bearer token -> node name (the CA's --tokens)
    tokens/node-<i>         node i's bearer token (the agent's --ca-token)
    ca/                     the CA's directory; ca/root-cert.pem is the trust bundle
    observer-tls/, operator/    with ``up(observer_tls=True)``: the agents' Observer server certificate and
                            the operator's client certificate (tls.crt, tls.key, ca.crt; 0700 directories)
    logs/ca.log, logs/agent-node-<i>.log    stdout and stderr of each process (appended on restart)
    pids/ca.json, pids/agent-node-<i>.json  pid, start time, netns, argv, log offset of the current run

Processes are started detached (own session, stdin /dev/null, output to their log) with ``ip netns exec``,
so they outlive the command that started them. A pid is trusted only together with the process's start
time (from /proc), so a recycled pid is never signalled.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import agent
from agent.capture import netns
from agent.lab.state import atomic_write

LABS_ROOT = Path("/run/ambit/labs")
DEFAULT_NAME = "ambit"
TRUST_DOMAIN = "cluster.local"
CA_PORT = 15012
OBSERVER_PORT = 4244
CA_READY = "ambit-ca: serving"  # python -m agent.ca prints this once it accepts connections
AGENT_READY = "ambit-agent ready"
PROJECT_ROOT = Path(agent.__file__).resolve().parent.parent

_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,22}[a-z0-9])?$")


class LabError(Exception):
    """Something the user must know about; the message says what to do."""


def check_name(name: str) -> str:
    """A lab name: 1-24 of a-z, 0-9 and '-' (no dots: '<name>.' prefixes the lab's namespaces)."""
    if not _NAME.match(name):
        raise LabError(f"invalid lab name {name!r}: use 1-24 of a-z, 0-9 and '-', alphanumeric at both ends")
    return name


def netns_prefix(name: str) -> str:
    """Prefix of every network namespace of lab `name`; the dot cannot occur in a lab name, so no other
    lab's namespaces share it."""
    return f"{name}."


def present_labs(root: Path = LABS_ROOT) -> list[str]:
    """Names of the labs under ``root`` (those with a lab.json)."""
    return sorted(p.name for p in root.iterdir() if (p / "lab.json").exists()) if root.is_dir() else []


def lab_name(name: str | None = None, root: Path = LABS_ROOT) -> str:
    """The lab a reading command (``ambit observe``, ``status``, ``policy explain``) means: ``name`` when
    given, else $AMBIT_LAB, else the only lab under ``root``, else "ambit"."""
    chosen = name or os.environ.get("AMBIT_LAB")
    if chosen:
        return chosen
    present = present_labs(root)
    return present[0] if len(present) == 1 else DEFAULT_NAME


# -- paths ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LabPaths:
    """The files of one lab."""

    root: Path

    @classmethod
    def of(cls, name: str, root: Path = LABS_ROOT) -> LabPaths:
        return cls(root / check_name(name))

    @property
    def lab_json(self) -> Path:
        return self.root / "lab.json"

    def observer_socket(self, node: str) -> Path:
        """Where a node's agent serves the Observer API (``ambit observe`` looks there)."""
        return self.root / "observer" / f"{node}.sock"

    @property
    def observer_tls(self) -> Path:
        """The agents' Observer server certificate (``up(observer_tls=True)``)."""
        return self.root / "observer-tls"

    @property
    def operator(self) -> Path:
        """The operator's certificate for the agents' mutual-TLS Observer ports."""
        return self.root / "operator"

    def admin_socket(self, node: str) -> Path:
        """Where a node's agent serves /config_dump and /metrics (``ambit status`` looks there)."""
        return self.root / "admin" / f"{node}.sock"

    @property
    def state(self) -> Path:
        return self.root / "state.yaml"

    @property
    def tokens(self) -> Path:
        return self.root / "tokens.yaml"

    @property
    def tokens_dir(self) -> Path:
        return self.root / "tokens"

    def token_file(self, node: str) -> Path:
        return self.tokens_dir / node

    @property
    def ca_dir(self) -> Path:
        return self.root / "ca"

    @property
    def trust_bundle(self) -> Path:
        return self.ca_dir / "root-cert.pem"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def log_file(self, proc: str) -> Path:
        return self.logs / f"{proc}.log"

    @property
    def pids(self) -> Path:
        return self.root / "pids"

    def pid_file(self, proc: str) -> Path:
        return self.pids / f"{proc}.json"


def agent_proc(node: str) -> str:
    """Process name (log and pid file stem) of a node's agent."""
    return f"agent-{node}"


# -- lab.json ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NodeInfo:
    name: str
    index: int  # topology index (node-1 is 0)
    netns: str
    ip: str
    uplink: str
    pod_cidr: str
    ip6: str = ""  # a dual-stack lab's IPv6 address of the uplink
    pod_cidr6: str = ""


@dataclass(frozen=True)
class PodInfo:
    namespace: str
    name: str
    node: str
    netns: str
    ip: str
    ifname: str
    host_ifname: str  # the node-side veth, in the node's namespace
    service_account: str
    ip6: str = ""  # a dual-stack lab's IPv6 address of the pod

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def ips(self) -> list[str]:
        """status.podIPs: IPv4 first, then IPv6 in a dual-stack lab."""
        return [self.ip, self.ip6] if self.ip6 else [self.ip]


@dataclass
class LabInfo:
    """lab.json: what `up` made; written first with only name and prefix, so `down` can always sweep."""

    name: str
    prefix: str
    phase: str = "building"  # building -> running
    created_at: str = ""
    trust_domain: str = TRUST_DOMAIN
    lab_id: str = ""
    switch: str = ""
    netns: list[str] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)  # Kubernetes namespaces in the initial state
    ca_node: str = ""
    ca_address: str = ""
    agents: bool = True
    agent_flags: list[str] = field(default_factory=list)
    observer_tls: bool = False  # the agents also serve the Observer on <node ip>:OBSERVER_PORT, mutual TLS
    dual_stack: bool = False  # nodes and pods have IPv6 addresses too
    nodes: list[NodeInfo] = field(default_factory=list)
    pods: list[PodInfo] = field(default_factory=list)

    def save(self, paths: LabPaths) -> None:
        atomic_write(paths.lab_json, (json.dumps(asdict(self), indent=2) + "\n").encode(), mode=0o644)

    @classmethod
    def load(cls, paths: LabPaths) -> LabInfo:
        try:
            raw = json.loads(paths.lab_json.read_text())
            raw["nodes"] = [NodeInfo(**n) for n in raw.get("nodes", [])]
            raw["pods"] = [PodInfo(**p) for p in raw.get("pods", [])]
            return cls(**raw)
        except FileNotFoundError:
            raise LabError(f"no lab {paths.root.name!r} (no {paths.lab_json}); "
                           f"start one with: ambit lab up --name {paths.root.name}") from None
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise LabError(f"cannot read {paths.lab_json}: {e}") from None

    def node(self, name: str) -> NodeInfo:
        for node in self.nodes:
            if node.name == name:
                return node
        raise LabError(f"no node {name!r} in lab {self.name!r} (nodes: {', '.join(n.name for n in self.nodes)})")


# -- processes ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProcRecord:
    """A started process, as recorded in pids/<name>.json."""

    name: str
    pid: int
    start_ticks: int  # /proc/<pid>/stat field 22: tells this process from a later one with the same pid
    netns: str
    argv: list[str]
    log: str
    log_offset: int  # where this run's output starts in the (appended) log
    started_at: float

    def save(self, paths: LabPaths) -> None:
        atomic_write(paths.pid_file(self.name), (json.dumps(asdict(self)) + "\n").encode(), mode=0o644)

    @classmethod
    def load(cls, path: Path) -> ProcRecord | None:
        """The record at `path`, or None when there is none or it is unreadable (a torn `up`)."""
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def output(self) -> str:
        """What this run has written to its log so far."""
        return read_from(Path(self.log), self.log_offset)


def records(paths: LabPaths) -> list[ProcRecord]:
    """Every process record of a lab."""
    if not paths.pids.is_dir():
        return []
    found = (ProcRecord.load(p) for p in sorted(paths.pids.glob("*.json")))
    return [r for r in found if r is not None]


def _stat(pid: int, path: str = "") -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) of a process (or of the thread at ``path``), or None."""
    try:
        with open(path or f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[19])


def _threads_exiting(pid: int) -> bool:
    """Whether a process whose main thread is a zombie still has threads (and so sockets) alive."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    return any((st := _stat(pid, f"/proc/{pid}/task/{tid}/stat")) is not None and st[0] not in "ZX" for tid in tids)


def start_ticks(pid: int) -> int:
    stat = _stat(pid)
    if stat is None:
        raise LabError(f"process {pid} exited at once")
    return stat[1]


def _reap(pid: int) -> None:
    """Collect `pid` if it is our own child (a command that started and then stops a process)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def alive(rec: ProcRecord) -> bool:
    """Whether the recorded process still runs (the same process: pid and start time match)."""
    stat = _stat(rec.pid)
    if stat is None or stat[1] != rec.start_ticks:
        return False
    if stat[0] in "ZX":
        if _threads_exiting(rec.pid):  # its listeners may still accept: not gone until every thread is
            return True
        _reap(rec.pid)
        return False
    return True


def read_from(path: Path, offset: int) -> str:
    """The text of `path` from byte `offset` ("" if the file is missing)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def child_env() -> dict[str, str]:
    """Environment of lab processes: this checkout first on the path, unbuffered output."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def spawn(paths: LabPaths, name: str, ns: str, argv: Sequence[str]) -> ProcRecord:
    """Start `argv` in namespace `ns`, detached: a new session (so the terminal's signals and the caller's
    exit do not reach it), stdin /dev/null, stdout and stderr appended to logs/<name>.log."""
    paths.logs.mkdir(exist_ok=True)
    paths.pids.mkdir(exist_ok=True)
    log = paths.log_file(name)
    full = netns.netns_argv(ns, argv)
    with open(log, "ab") as f:
        f.write(f"=== ambit lab: {time.strftime('%Y-%m-%d %H:%M:%S')} starting {name}: {' '.join(full)}\n".encode())
        f.flush()
        offset = f.tell()
        # posix_spawn, not Popen: the child is meant to outlive us, and a Popen object would warn about it.
        pid = os.posix_spawnp(full[0], full, child_env(), setsid=True, file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, f.fileno(), 1),
            (os.POSIX_SPAWN_DUP2, f.fileno(), 2),
        ])
    rec = ProcRecord(name=name, pid=pid, start_ticks=start_ticks(pid), netns=ns, argv=list(full), log=str(log),
                     log_offset=offset, started_at=time.time())
    rec.save(paths)
    return rec


def python() -> str:
    """The interpreter lab processes run with: the one running this command (the project's venv)."""
    return sys.executable or "python3"


def signal_group(pid: int, sig: signal.Signals) -> None:
    """Signal a lab process and whatever it started (it leads its own session and process group)."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def stop(recs: Iterable[ProcRecord], timeout: float, kill: bool = False) -> list[str]:
    """SIGTERM (SIGKILL with `kill`) the live ones, wait up to `timeout`, SIGKILL what is left and wait up to
    5 s more. Returns one line per process for the user; raises LabError if a process survives SIGKILL."""
    live = [r for r in recs if alive(r)]
    first = signal.SIGKILL if kill else signal.SIGTERM
    for rec in live:
        signal_group(rec.pid, first)
    report: list[str] = []
    left = _wait_dead(live, timeout)
    for rec in live:
        if rec not in left:
            report.append(f"stopped {rec.name} (pid {rec.pid}, {first.name})")
    if left:
        for rec in left:
            signal_group(rec.pid, signal.SIGKILL)
        stuck = _wait_dead(left, 5.0)
        report += [f"killed {r.name} (pid {r.pid}): still running {timeout:g}s after SIGTERM"
                   for r in left if r not in stuck]
        if stuck:
            raise LabError("processes survived SIGKILL: " + ", ".join(f"{r.name} (pid {r.pid})" for r in stuck))
    return report


def _wait_dead(recs: list[ProcRecord], timeout: float) -> list[ProcRecord]:
    deadline = time.monotonic() + timeout
    left = list(recs)
    while True:
        left = [r for r in left if alive(r)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


# -- sweeping: processes in the lab's namespaces -----------------------------------------------------------------
def _netns_ids(names: Iterable[str]) -> dict[tuple[int, int], str]:
    ids: dict[tuple[int, int], str] = {}
    for name in names:
        with contextlib.suppress(OSError):
            st = os.stat(netns.netns_path(name))
            ids[(st.st_dev, st.st_ino)] = name
    return ids


def _ancestors() -> set[int]:
    """This process and its ancestors (never swept, even when run from inside a lab namespace)."""
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    return pids


def processes_in(names: Iterable[str]) -> list[ProcRecord]:
    """Processes whose network namespace is one of `names` (whatever started them), as records."""
    ids = _netns_ids(names)
    if not ids:
        return []
    mine = _ancestors()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in mine:
            continue
        pid = int(entry)
        try:
            st = os.stat(f"/proc/{pid}/ns/net")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ns = ids.get((st.st_dev, st.st_ino))
        stat = _stat(pid)
        if ns is not None and stat is not None:
            argv = [a.decode(errors="replace") for a in cmdline if a]
            found.append(ProcRecord(name=f"stray process {' '.join(argv)[:60]!r} in {ns}", pid=pid, start_ticks=stat[1],
                                    netns=ns, argv=argv, log="", log_offset=0, started_at=0.0))
    return found


def lab_namespaces(name: str, info: LabInfo | None) -> list[str]:
    """Every network namespace of lab `name`: the recorded ones and any carrying its prefix.

    Deleting them also removes the agents' eBPF attachments: the agents run under `ip netns exec`, whose
    fresh /sys has no bpffs, so they attach clsact filters, which live in the node's namespace."""
    prefix = netns_prefix(name)
    recorded = info.netns if info is not None else []
    return list(dict.fromkeys([*recorded, *(n for n in netns.list_netns() if n.startswith(prefix))]))


def any_child(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def remove_tree(path: Path) -> None:
    """Remove the lab directory, then its parents if they are left empty."""
    shutil.rmtree(path, ignore_errors=True)
    if path.exists():
        raise LabError(f"could not remove {path}")
    for parent in (path.parent, path.parent.parent):
        if parent.is_dir() and not any_child(parent):
            with contextlib.suppress(OSError):
                parent.rmdir()
