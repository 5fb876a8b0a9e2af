"""The agent container's entrypoint: kernel headers for bcc, then the agent (which drains itself on SIGTERM).

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
2. Settings a ConfigMap value cannot express as a flag: ``AMBIT_FAIL_OPEN=true`` adds ``--fail-open``;
   ``AMBIT_DRAIN_SECONDS`` becomes ``--drain-seconds``: on SIGTERM the agent accepts no new connections and
   lets its proxied ones finish for that long (restarting the agent resets long-lived connections; the drain
   lets short ones finish and gives long ones the time an operator chose).
3. Then it becomes the agent (exec), so signals and the exit status are the agent's own.

Paths can be moved with AMBIT_MODULES_DIR, AMBIT_HOST_ROOT and AMBIT_HEADERS_SRC (tests do). Standard
library only: it runs before anything else is known to work.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

TRUE = frozenset({"1", "true", "yes", "on"})


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
    drain = env.get("AMBIT_DRAIN_SECONDS", "").strip()
    if drain and "--drain-seconds" not in command:
        try:
            command += ["--drain-seconds", str(max(0.0, float(drain)))]
        except ValueError:
            log(f"AMBIT_DRAIN_SECONDS={drain!r} is not a number; no drain")
    return command


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
    command = agent_command(args, env)
    sys.stdout.flush()
    os.execvp(command[0], command)


if __name__ == "__main__":
    sys.exit(main())
