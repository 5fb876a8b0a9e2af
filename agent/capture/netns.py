"""Network-namespace helpers: enter a named namespace from Python, run commands and processes in it.

Named namespaces are the ones `ip netns add` creates (a bind mount under /run/netns). Entering is
thread-scoped (setns(2) with CLONE_NEWNET changes only the calling thread), so `entered()` is safe in a
multi-threaded program as long as the body does not hand work to other, already-running threads:
sockets and netlink sockets created inside the block stay bound to the namespace after it ends.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

NETNS_RUN_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)
P = ParamSpec("P")
T = TypeVar("T")


def netns_path(name: str) -> str:
    """Path of a named network namespace (as created by `ip netns add`)."""
    return os.path.join(NETNS_RUN_DIR, name)


def list_netns() -> list[str]:
    """Names of all named network namespaces."""
    try:
        return sorted(os.listdir(NETNS_RUN_DIR))
    except FileNotFoundError:
        return []


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def enter(name: str) -> None:
    """Move the calling thread into namespace `name` for good (for child processes and worker threads)."""
    fd = os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(fd)
    finally:
        os.close(fd)


@contextmanager
def entered(name: str | None) -> Iterator[None]:
    """Run the body with the calling thread inside namespace `name` (None: stay where we are)."""
    if name is None:
        yield
        return
    target = os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
    orig = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(orig)
    finally:
        os.close(target)
        os.close(orig)


def call(name: str | None, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Call `fn` in this thread with the thread inside namespace `name`."""
    with entered(name):
        return fn(*args, **kwargs)


def netns_argv(name: str | None, argv: Sequence[str]) -> list[str]:
    """`argv` prefixed with `ip netns exec <name>` (unchanged for None)."""
    return [*(["ip", "netns", "exec", name] if name else []), *argv]


def run(
    name: str | None, argv: Sequence[str], *, check: bool = True, timeout: float = 30.0, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    """Run a command in namespace `name` with `ip netns exec`, capturing text output."""
    kwargs.setdefault("capture_output", True)
    return subprocess.run(netns_argv(name, argv), check=check, timeout=timeout, text=True, **kwargs)


def popen(name: str | None, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
    """Start a command in namespace `name` with `ip netns exec` (caller owns the process)."""
    return subprocess.Popen(netns_argv(name, argv), **kwargs)


def _child(name: str, target: Callable[..., object], args: tuple[Any, ...]) -> None:
    enter(name)
    target(*args)


def start_process(name: str, target: Callable[..., object], *args: Any) -> BaseProcess:
    """Fork a Python process that enters namespace `name` and runs `target(*args)` (caller joins/kills it)."""
    import multiprocessing  # here: the agent never forks, and the package costs it ~0.5 MiB (20 modules)

    proc = multiprocessing.get_context("fork").Process(target=_child, args=(name, target, args), daemon=True)
    proc.start()
    return proc


def sysctl_write(name: str | None, key: str, value: str) -> str:
    """Set a sysctl (dotted key) inside namespace `name`; returns the previous value."""
    path = "/proc/sys/" + key.replace(".", "/")
    with entered(name):
        with open(path) as f:
            old = f.read().strip()
        with open(path, "w") as f:
            f.write(value)
    return old


def sysctl_read(name: str | None, key: str) -> str:
    """Read a sysctl (dotted key) inside namespace `name`."""
    with entered(name), open("/proc/sys/" + key.replace(".", "/")) as f:
        return f.read().strip()
