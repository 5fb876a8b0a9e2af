"""Helpers for the policy and observability end-to-end tests (issues 4 and 5) on an `ambit lab`.

Built on tests/lab_helpers.py (echo servers, clients, ``eventually``, lab process checks); this module adds what
those tests need beyond it: a lab started with extra agent flags, the ``ambit`` command run as users run it,
connection attempts classified (answered, reset, EOF), a byte server with exact counts each way, the agents'
admin endpoints over their unix sockets (config dump, Prometheus metrics), ``ambit observe -o json`` parsed,
and the Observer's ServerStatus read with a real gRPC client.

Every wait is bounded, every subprocess has a timeout, every socket a timeout; traffic stays inside the lab.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.capture import netns
from agent.lab import control
from agent.lab import runtime as rt
from agent.lab.runtime import LabInfo, LabPaths, PodInfo
from agent.telemetry import observer_pb2 as pb
from agent.telemetry import observer_pb2_grpc as pb_grpc
from tests import lab_helpers as h

PROJECT = Path(__file__).resolve().parent.parent
TRUST_DOMAIN = "cluster.local"
CLI_TIMEOUT = 60.0  # any one `ambit ...` command
IO_TIMEOUT = 10.0  # any one socket operation


# -- skipping ------------------------------------------------------------------------------------------------------
def _bcc_usable() -> bool:
    return importlib.util.find_spec("bcc") is not None and Path(f"/lib/modules/{os.uname().release}/build").exists()


def lab_marks() -> list[pytest.MarkDecorator]:
    """Skip cleanly unless root with bcc, kernel headers and the tools the lab uses."""
    root = os.geteuid() == 0
    missing = [t for t in ("ip", "tc", "timeout") if shutil.which(t) is None]
    return [
        pytest.mark.root,
        pytest.mark.skipif(not root, reason="needs root (network namespaces, eBPF)"),
        pytest.mark.skipif(root and not _bcc_usable(), reason="the agent needs bcc and kernel headers"),
        pytest.mark.skipif(root and bool(missing), reason=f"needs {', '.join(missing)}"),
    ]


# -- the lab -------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def lab_with_flags(prefix: str, *, nodes: int, pods: int, namespaces: Sequence[str],
                   agent_flags: Sequence[str] = ()) -> Iterator[tuple[LabInfo, LabPaths]]:
    """``lab_helpers.running_lab`` with extra agent flags: a unique name, always torn down, and a failure if
    anything of it (namespaces, directory, processes) is left."""
    name = f"{prefix}-{secrets.token_hex(3)}"
    try:
        info = control.up(name, nodes=nodes, pods=pods, namespaces=namespaces, timeout=120,
                          agent_flags=agent_flags)
        yield info, LabPaths.of(name)
    finally:
        control.down(name, timeout=5)
        left = [n for n in netns.list_netns() if n.startswith(rt.netns_prefix(name))]
        left += [str(p) for p in [LabPaths.of(name).root] if p.exists()] + h.netns_files(name)
        procs = h.lab_processes(name)
        assert not left and not procs, f"lab {name} left {left} {procs}"


def pod(info: LabInfo, name: str) -> PodInfo:
    return next(p for p in info.pods if p.name == name)


@dataclass
class RunningLab:
    """A lab a test module brought up: its record and files, and its pods by name."""

    info: LabInfo
    paths: LabPaths

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def nodes(self) -> list[str]:
        return [n.name for n in self.info.nodes]

    def pod(self, name: str) -> PodInfo:
        return pod(self.info, name)


def identity(p: PodInfo) -> str:
    return f"spiffe://{TRUST_DOMAIN}/ns/{p.namespace}/sa/{p.service_account}"


def principal(p: PodInfo) -> str:
    """Istio's principal form (no spiffe:// scheme), as AuthorizationPolicy's ``principals`` takes it."""
    return identity(p).removeprefix("spiffe://")


def netns_inode(p: PodInfo) -> int:
    """The inode of a pod's network namespace: the same while the pod lives (a restart would make a new one)."""
    return os.stat(f"/run/netns/{p.netns}").st_ino


# -- the ambit command -----------------------------------------------------------------------------------------------
def ambit(*args: str, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run ``ambit ARGS`` as a user would (a new process of the project's interpreter)."""
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], cwd=PROJECT, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout, check=False)


def ambit_ok(*args: str, timeout: float = CLI_TIMEOUT) -> str:
    res = ambit(*args, timeout=timeout)
    assert res.returncode == 0, f"ambit {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    return res.stdout


def ambit_many(commands: Sequence[Sequence[str]],
               timeout: float = CLI_TIMEOUT) -> list[subprocess.CompletedProcess[str]]:
    """Several ``ambit`` commands at once (each is a second of interpreter start-up)."""
    procs = [subprocess.Popen([sys.executable, "-m", "agent.cli", *cmd], cwd=PROJECT, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for cmd in commands]
    results = []
    try:
        for cmd, proc in zip(commands, procs, strict=True):
            out, err = proc.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(list(cmd), proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=5)
    return results


def yaml_file(tmp: Path, text: str) -> Path:
    fd, name = tempfile.mkstemp(dir=tmp, suffix=".yaml")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return Path(name)


def lab_apply(lab: str, tmp: Path, text: str) -> subprocess.CompletedProcess[str]:
    """``ambit lab apply -f FILE`` with ``text`` as the file."""
    return ambit("lab", "--name", lab, "apply", "-f", str(yaml_file(tmp, text)))


# -- connection attempts --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Attempt:
    """What became of one connection: "ok" (answered, byte-exact), "reset" (RST), "eof" (closed without a
    byte of answer), "refused" (connect refused), "timeout"; ``local`` is the client's address."""

    outcome: str
    local: tuple[str, int] | None
    detail: str = ""

    @property
    def refused(self) -> bool:
        """Refused the way the mesh refuses: the proxy accepted, then reset (or closed) without an answer."""
        return self.outcome in ("reset", "eof")


def attempt(src: PodInfo, dst: PodInfo, port: int = h.SERVER_PORT, size: int = 1000,
            connect_timeout: float = 5.0) -> Attempt:
    """One connection ``src`` -> ``dst:port`` against a lab_helpers.EchoServer, classified."""
    payload = h.Payload.make(size)
    local: tuple[str, int] | None = None
    try:
        client = h.Client(src, (dst.ip, port), connect_timeout)
    except ConnectionRefusedError as e:
        return Attempt("refused", None, str(e))
    except ConnectionResetError as e:  # accepted and reset before connect() returned
        return Attempt("reset", None, str(e))
    except TimeoutError as e:
        return Attempt("timeout", None, str(e))
    local = client.local
    try:
        client.sock.settimeout(IO_TIMEOUT)
        echo = client.exchange(payload)
    except (ConnectionResetError, BrokenPipeError) as e:
        return Attempt("reset", local, str(e))
    except TimeoutError as e:
        return Attempt("timeout", local, str(e))
    except ConnectionError as e:  # lab_helpers' _recv_exact / _recv_line met EOF
        nothing = "EOF after 0 of" in str(e) or "EOF in the answer line after b''" in str(e)
        return Attempt("eof" if nothing else "error", local, str(e))
    finally:
        client.close()
    if echo.server_sha256 != payload.sha256 or echo.echoed_sha256 != payload.sha256:
        return Attempt("corrupt", local, f"{echo}")
    return Attempt("ok", local)


def refused_until(src: PodInfo, dst: PodInfo, port: int, timeout: float) -> tuple[float, Attempt]:
    """Connect over and over until a connection is refused; (seconds from now, that attempt). AssertionError
    after ``timeout``; any outcome other than ok/refused fails at once."""
    start = time.monotonic()
    deadline = start + timeout
    while True:
        a = attempt(src, dst, port, size=64)
        if a.refused:
            return time.monotonic() - start, a
        assert a.outcome == "ok", f"{src.key} -> {dst.key}:{port}: {a}"
        if time.monotonic() >= deadline:
            raise AssertionError(f"{src.key} -> {dst.key}:{port} still answered after {timeout:g}s")


# -- a server with exact byte counts -------------------------------------------------------------------------------
# One exchange per connection: the client sends 16 bytes (request size, reply size, big-endian) and the request;
# the server reads exactly that, answers exactly the reply size, and closes. So the client sends 16 + request
# bytes and receives reply bytes, no more: what the flows must count each way.
HEADER = 16


@dataclass
class ByteServer(h.PodServer):
    """Reads exactly the request its header announces, answers exactly the reply size, closes."""

    served: list[tuple[tuple[str, int], int, int]] = field(default_factory=list)  # (peer, got, sent)

    def _serve(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        want, reply = struct.unpack("!QQ", h._recv_exact(conn, HEADER))
        got = len(h._recv_exact(conn, want))
        conn.sendall(_pattern(reply))
        with self._lock:
            self.served.append((peer, got, reply))


def _pattern(n: int) -> bytes:
    return (b"0123456789abcdef" * (n // 16 + 1))[:n]


@dataclass(frozen=True)
class Exchange:
    local: tuple[str, int]
    sent: int  # bytes the client sent (header included)
    received: int  # bytes it received


def byte_exchange(src: PodInfo, dst: PodInfo, port: int, request: int, reply: int) -> Exchange:
    """One connection to a ByteServer: ``request`` bytes up, ``reply`` bytes down, then EOF; checked."""
    result = _byte_connection(src, dst, port, request, reply)
    assert isinstance(result, Exchange), f"{src.key} -> {dst.key}:{port}: {result}"
    return result


def byte_attempt(src: PodInfo, dst: PodInfo, port: int) -> Attempt:
    """A ByteServer connection, classified like ``attempt`` (with the client's address when it connected)."""
    result = _byte_connection(src, dst, port, 100, 100)
    return Attempt("ok", result.local) if isinstance(result, Exchange) else result


def _byte_connection(src: PodInfo, dst: PodInfo, port: int, request: int, reply: int) -> Exchange | Attempt:
    with netns.entered(src.netns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    local: tuple[str, int] | None = None
    try:
        sock.settimeout(5.0)
        sock.connect((dst.ip, port))
        sock.settimeout(IO_TIMEOUT)
        ip, lport = sock.getsockname()[:2]
        local = (str(ip), int(lport))
        sock.sendall(struct.pack("!QQ", request, reply) + os.urandom(request))
        back = h._recv_exact(sock, reply)
        if back != _pattern(reply):
            return Attempt("corrupt", local, "the reply came back different")
        if sock.recv(1) != b"":
            return Attempt("corrupt", local, "the server sent more than asked")
    except ConnectionRefusedError as e:
        return Attempt("refused", local, str(e))
    except (ConnectionResetError, BrokenPipeError) as e:
        return Attempt("reset", local, str(e))
    except ConnectionError as e:
        return Attempt("eof" if "EOF after 0 of" in str(e) else "error", local, str(e))
    except TimeoutError as e:
        return Attempt("timeout", local, str(e))
    finally:
        sock.close()
    return Exchange(local, HEADER + request, reply)


# -- the agents' admin endpoints -------------------------------------------------------------------------------------
async def _admin_get(sock: Path, path: str, seconds: float) -> tuple[int, str]:
    connector = aiohttp.UnixConnector(path=str(sock))
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=seconds)) as session, \
            session.get(f"http://agent{path}") as response:
        return response.status, await response.text()


def admin_get(paths: LabPaths, node: str, path: str, timeout: float = 5.0) -> tuple[int, str]:
    """GET ``path`` from a node agent's admin endpoints (its unix socket in the lab)."""
    return asyncio.run(_admin_get(paths.admin_socket(node), path, timeout))


def config_dump(paths: LabPaths, node: str) -> dict[str, Any]:
    code, body = admin_get(paths, node, "/config_dump")
    assert code == 200, f"{node} /config_dump answered {code}: {body}"
    dump: dict[str, Any] = json.loads(body)
    return dump


def ready(paths: LabPaths, node: str) -> bool:
    try:
        return admin_get(paths, node, "/healthz/ready")[0] == 200
    except (aiohttp.ClientError, OSError, TimeoutError):
        return False


def wait_agents(paths: LabPaths, nodes: Sequence[str], *, policies: Sequence[str] | None = None,
                captured: Mapping[str, set[str]] | None = None, timeout: float = 10.0) -> float:
    """Wait until every agent has exactly ``policies`` in force and (per node) captures exactly the pod IPs in
    ``captured``, and reports ready; returns the seconds waited."""
    start = time.monotonic()
    last: dict[str, Any] = {}

    def settled() -> bool:
        for node in nodes:
            dump = config_dump(paths, node)
            last[node] = {"policies": dump["policies"], "captured": sorted(dump["captured"])}
            if policies is not None and sorted(dump["policies"]) != sorted(policies):
                return False
            if captured is not None and set(dump["captured"]) != captured.get(node, set()):
                return False
            if not ready(paths, node):
                return False
        return True

    try:
        h.eventually(settled, timeout, "the agents' policies and capture", interval=0.05)
    except AssertionError as e:
        raise AssertionError(f"{e}; last seen: {last}; wanted policies={policies} captured={captured}") from None
    return time.monotonic() - start


@dataclass(frozen=True)
class Sample:
    name: str
    labels: Mapping[str, str]
    value: float


def scrape(paths: LabPaths, node: str) -> tuple[list[str], list[Sample]]:
    """GET /metrics from a node's agent and parse it with the Prometheus text parser: (family names, samples)."""
    code, text = admin_get(paths, node, "/metrics")
    assert code == 200, f"{node} /metrics answered {code}"
    families = list(text_string_to_metric_families(text))
    return ([f.name for f in families],
            [Sample(s.name, dict(s.labels), s.value) for f in families for s in f.samples])


# -- ambit observe ---------------------------------------------------------------------------------------------------
def observe(lab: str, *args: str) -> list[dict[str, Any]]:
    """``ambit observe --lab LAB -o json ARGS``: one dict per line (flows and lost events)."""
    out = ambit_ok("observe", "--lab", lab, "-o", "json", *args)
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def observe_many(lab: str, queries: Sequence[Sequence[str]]) -> list[list[dict[str, Any]]]:
    """Several ``observe`` queries at once."""
    results = ambit_many([["observe", "--lab", lab, "-o", "json", *q] for q in queries])
    out = []
    for q, res in zip(queries, results, strict=True):
        assert res.returncode == 0, f"ambit observe {' '.join(q)} failed ({res.returncode}): {res.stderr}"
        out.append([json.loads(line) for line in res.stdout.splitlines() if line.strip()])
    return out


def flows(responses: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [dict(r["flow"]) for r in responses if "flow" in r]


def lost(responses: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [dict(r) for r in responses if "lost_events" in r]


def tcp(flow: Mapping[str, Any]) -> Mapping[str, Any]:
    return dict(flow.get("l4", {}).get("tcp", {}))


class Follower:
    """``ambit observe ... -f`` running in the background (in its own session, under timeout(1), killed when
    done); its output lines collected by a thread."""

    def __init__(self, lab: str, *args: str, limit: int = 60) -> None:
        argv = ["timeout", "-s", "KILL", str(limit), sys.executable, "-m", "agent.cli", "observe", "--lab", lab,
                "-o", "json", "--follow", *args]
        self.proc = subprocess.Popen(argv, cwd=PROJECT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.lines: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.strip():
                with self._lock:
                    self.lines.append(json.loads(line))

    def seen(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.lines)

    def stop(self) -> str:
        """Kill it; returns its stderr."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._reader.join(timeout=5)
        assert self.proc.stderr is not None
        return self.proc.stderr.read()


# -- the Observer API with a real gRPC client ------------------------------------------------------------------------
def server_status(paths: LabPaths, node: str) -> pb.ServerStatusResponse:
    with grpc.insecure_channel(f"unix:{paths.observer_socket(node)}") as channel:
        stub = pb_grpc.ObserverStub(channel)  # type: ignore[no-untyped-call]
        status: pb.ServerStatusResponse = stub.ServerStatus(pb.ServerStatusRequest(), timeout=5)
        return status
