"""Ambit's HBONE peers as processes: ``python -m hbone serve`` and ``python -m hbone forward``.

Each prints ``listening on HOST:PORT`` on stdout once its listener is up; we pass port 0 and read the
port it actually bound from that line.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

from agent.capture.netns import entered, netns_argv
from bench.envoy import TlsFiles
from bench.procs import Child, parse_hostport, python_env, spawn, wait_accepting
from hbone.identity import SpiffeId

READY_PREFIX = "listening on"
ROOT = Path(__file__).resolve().parent.parent


def ambit_available() -> bool:
    return (ROOT / "hbone" / "__main__.py").is_file()


def _start(name: str, args: list[str], log: Path, timeout: float,
           probe: bool, netns: str | None = None) -> tuple[Child, tuple[str, int]]:
    argv = netns_argv(netns, [sys.executable, "-m", "hbone", *args])
    child = spawn(name, argv, log, stdout_pipe=True, env=python_env(), cwd=ROOT)
    try:
        addr = parse_hostport(child.wait_for_line(READY_PREFIX, timeout))
        if probe:
            with entered(netns):
                wait_accepting(addr, timeout, child)
        return child, addr
    except BaseException:
        child.stop()
        raise


@contextlib.contextmanager
def ambit_hbone_server(workdir: Path, tls: TlsFiles, trust_domain: str, *, timeout: float = 20.0,
                       listen: str = "127.0.0.1:0", netns: str | None = None,
                       any_target: bool = False) -> Iterator[tuple[Child, tuple[str, int]]]:
    """``python -m hbone serve`` (in network namespace ``netns``, if given; relaying to any target with
    ``any_target``): yields the child and the HBONE address it listens on."""
    args = ["serve", "--listen", listen, "--cert", str(tls.chain), "--key", str(tls.key),
            "--bundle", str(tls.roots), "--trust-domain", trust_domain, *(["--any-target"] if any_target else [])]
    child, addr = _start("ambit-serve", args, workdir / "ambit-serve.log", timeout, probe=True, netns=netns)
    try:
        yield child, addr
    finally:
        child.stop()


@contextlib.contextmanager
def ambit_hbone_client(workdir: Path, tls: TlsFiles, trust_domain: str, *, hbone: tuple[str, int],
                       authority: str, expect: SpiffeId, timeout: float = 20.0,
                       listen: str = "127.0.0.1:0",
                       netns: str | None = None) -> Iterator[tuple[Child, tuple[str, int]]]:
    """``python -m hbone forward``: yields the child and its plaintext listener address. The listener is
    not probed with a connect (a connect would open a tunnel); it is up once the ready line is printed."""
    args = ["forward", "--listen", listen, "--hbone", f"{hbone[0]}:{hbone[1]}", "--authority", authority,
            "--expect", str(expect), "--cert", str(tls.chain), "--key", str(tls.key),
            "--bundle", str(tls.roots), "--trust-domain", trust_domain]
    child, addr = _start("ambit-forward", args, workdir / "ambit-forward.log", timeout, probe=False, netns=netns)
    try:
        yield child, addr
    finally:
        child.stop()
