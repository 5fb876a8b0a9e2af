"""The agent container's entrypoint: kernel headers for bcc, then the agent, drained on SIGTERM.

    python daemonset/entrypoint.py -- /opt/ambit/.venv/bin/python -m agent run ...   (the DaemonSet's command)

1. Kernel headers. bcc compiles the eBPF programs against ``/lib/modules/$(uname -r)/{build,source}``. The
   DaemonSet mounts the host's ``/lib/modules`` and ``/usr/src`` read-only under ``/host`` and gives the
   container its own (empty) ``/lib/modules``; this links the running kernel's entries there:
   - the host's headers, when ``/host/lib/modules/<release>/build`` leads to a tree with ``include/``
     (absolute links such as Debian's and Ubuntu's ``build -> /usr/src/linux-headers-<release>`` are
     followed inside ``/host``);
   - else the Debian headers the image carries (``linux-headers-amd64``), linked exactly as
     scripts/bootstrap.sh links them on a machine whose kernel ships none: ``build`` -> the newest
     ``/usr/src/linux-headers-*-amd64``, ``source`` -> the newest ``...-common``. The programs use uapi types
     only, so another version's headers serve (kind nodes and minikube's ISO have no headers).
2. ``AMBIT_FAIL_OPEN=true`` adds ``--fail-open`` to the command (a ConfigMap value cannot add a flag).
3. The drain. On SIGTERM the agent is not stopped at once: it keeps carrying the node's traffic until its
   proxied connections have ended (``connections`` in its admin ``/config_dump``, polled every second), at most
   ``AMBIT_DRAIN_SECONDS``; then it gets SIGTERM and the exit status is its own. A second SIGTERM (or SIGINT)
   ends the drain at once. Restarting the agent resets long-lived connections; the drain lets short ones
   finish and gives long ones the time an operator chose.

Paths and the admin address can be moved with AMBIT_MODULES_DIR, AMBIT_HOST_ROOT, AMBIT_HEADERS_SRC and
AMBIT_ADMIN_URL (tests do). Standard library only: it runs before anything else is known to work.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import FrameType

TRUE = frozenset({"1", "true", "yes", "on"})
POLL_SECONDS = 1.0


def log(message: str) -> None:
    print(f"ambit-entrypoint: {message}", file=sys.stderr, flush=True)


# -- kernel headers ------------------------------------------------------------------------------------------
def _version_key(path: Path) -> list[tuple[int, int | str]]:
    """Natural order, as ``sort -V``: linux-headers-6.1.0-28 after linux-headers-6.1.0-9."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", path.name)]


def _newest(directory: Path, pattern: str) -> Path | None:
    found = sorted((p for p in directory.glob(pattern) if p.is_dir()), key=_version_key)
    return found[-1] if found else None


def resolve_in(root: Path, path: str, hops: int = 16) -> Path | None:
    """Where ``path`` (absolute, as seen on the host) leads inside ``root`` (the host's tree mounted there),
    following symbolic links as the host would; None when it leads nowhere."""
    current = PurePosixPath(path)
    for _ in range(hops):
        inside = root / current.relative_to("/")
        if not inside.is_symlink():
            return inside if inside.exists() else None
        target = PurePosixPath(os.readlink(inside))
        current = PurePosixPath(os.path.normpath(target if target.is_absolute() else current.parent / target))
    return None


@dataclass(frozen=True)
class Headers:
    build: Path
    source: Path
    origin: str  # "host" or "image"


def find_headers(release: str, host_root: Path, headers_src: Path) -> Headers | None:
    """The host's headers for ``release`` when it has them, else the image's Debian headers, else None."""
    build = resolve_in(host_root, f"/lib/modules/{release}/build")
    if build is not None and (build / "include").is_dir():
        source = resolve_in(host_root, f"/lib/modules/{release}/source")
        return Headers(build, source if source is not None else build, "host")
    arch, common = _newest(headers_src, "linux-headers-*-amd64"), _newest(headers_src, "linux-headers-*-common")
    if arch is not None and common is not None:
        return Headers(arch, common, "image")
    return None


def link_kernel_headers(release: str, modules: Path, host_root: Path, headers_src: Path) -> str:
    """Make ``modules/<release>/{build,source}`` lead to kernel headers; returns what was done, for the log."""
    target = modules / release
    if (target / "build" / "include").is_dir():
        return f"kernel headers for {release} already in {target}"
    headers = find_headers(release, host_root, headers_src)
    if headers is None:
        return (f"no kernel headers for {release}: neither the host's ({host_root}/lib/modules/{release}/build) "
                f"nor the image's ({headers_src}/linux-headers-*); bcc will fail to compile the programs")
    target.mkdir(parents=True, exist_ok=True)
    for name, dest in (("build", headers.build), ("source", headers.source)):
        link = target / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(dest)
    what = "the host's" if headers.origin == "host" else "the image's Debian"
    return f"linked {target}/build -> {headers.build} ({what} headers)"


# -- the command ---------------------------------------------------------------------------------------------
def agent_command(argv: Sequence[str], env: Mapping[str, str]) -> list[str]:
    command = list(argv)
    if env.get("AMBIT_FAIL_OPEN", "").strip().lower() in TRUE and "--fail-open" not in command:
        command.append("--fail-open")
    return command


def proxied_connections(admin_url: str, timeout: float = 2.0) -> int | None:
    """The agent's proxied connections from its /config_dump; None when it does not answer."""
    try:
        with urllib.request.urlopen(f"{admin_url}/config_dump", timeout=timeout) as response:
            dump = json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None
    count = dump.get("connections") if isinstance(dump, dict) else None
    return count if isinstance(count, int) else None


class Supervisor:
    """Runs the agent as a child; SIGTERM starts the drain, and the agent's own exit ends everything."""

    def __init__(self, command: Sequence[str], *, drain_seconds: float, admin_url: str,
                 connections: Callable[[str], int | None] = proxied_connections) -> None:
        self.command = list(command)
        self.drain_seconds = drain_seconds
        self.admin_url = admin_url
        self.connections = connections
        self._stop = threading.Event()
        self._signals = 0

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._signals += 1
        self._stop.set()

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        child = subprocess.Popen(self.command)
        while child.poll() is None and not self._stop.wait(0.2):
            pass
        if child.poll() is None:
            self._drain(child)
            child.send_signal(signal.SIGTERM)
        status = child.wait()
        return 128 - status if status < 0 else status

    def _drain(self, child: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + self.drain_seconds
        seen = self._signals
        while child.poll() is None and self._signals == seen:
            count = self.connections(self.admin_url)
            if not count:
                log(f"draining: {'no proxied connections left' if count == 0 else 'the agent does not answer'}; "
                    "stopping it")
                return
            left = deadline - time.monotonic()
            if left <= 0:
                log(f"drain period over with {count} proxied connection(s) left; stopping the agent")
                return
            log(f"draining: {count} proxied connection(s), up to {left:.0f} s more")
            self._stop.clear()
            self._stop.wait(min(POLL_SECONDS, left))
        if child.poll() is None:
            log("second signal: stopping the agent now")


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    env = os.environ if env is None else env
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        log("usage: entrypoint.py -- COMMAND [ARG...]")
        return 2
    log(link_kernel_headers(os.uname().release, Path(env.get("AMBIT_MODULES_DIR", "/lib/modules")),
                            Path(env.get("AMBIT_HOST_ROOT", "/host")), Path(env.get("AMBIT_HEADERS_SRC", "/usr/src"))))
    try:
        drain = float(env.get("AMBIT_DRAIN_SECONDS", "20"))
    except ValueError:
        log(f"AMBIT_DRAIN_SECONDS={env.get('AMBIT_DRAIN_SECONDS')!r} is not a number; no drain")
        drain = 0.0
    supervisor = Supervisor(agent_command(args, env), drain_seconds=max(0.0, drain),
                            admin_url=env.get("AMBIT_ADMIN_URL", "http://127.0.0.1:15000"))
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
