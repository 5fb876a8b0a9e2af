"""The eBPF programs of bpf/redirect.c, compiled and loaded through bcc."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BPF_DIR = Path(__file__).resolve().parents[2] / "bpf"
POD_PROG = "ambit_pod_ingress"
UPLINK_PROG = "ambit_uplink_ingress"
DOOR_PROG = "ambit_pod_egress"
LOOKUP_PROG = "ambit_sk_lookup"


class RedirectError(RuntimeError):
    """The capture could not be set up (the message says what is missing)."""


def _kernel_headers_problem() -> str | None:
    release = os.uname().release
    build = f"/lib/modules/{release}/build"
    if not os.path.exists(os.path.join(build, "include")):
        return (
            f"kernel headers not found: {build} is missing (this kernel ships none). Run "
            "scripts/bootstrap.sh, which installs linux-headers-amd64 and links "
            f"/lib/modules/{release}/build and /source to Debian's headers."
        )
    return None


def compile_programs(extra_cflags: Sequence[str] = ()) -> Any:
    """Compile bpf/redirect.c with bcc; raise RedirectError naming what is missing."""
    try:
        from bcc import BPF
    except ImportError as e:
        raise RedirectError(
            "bcc is not importable: install Debian's python3-bpfcc (the PyPI package 'bcc' is something "
            "else) and use /usr/bin/python3 or a venv made with --system-site-packages"
        ) from e
    problem = _kernel_headers_problem()
    if problem:
        raise RedirectError(problem)
    src = BPF_DIR / "redirect.c"
    try:
        return BPF(src_file=str(src).encode(), cflags=[f"-I{BPF_DIR}", *extra_cflags])
    except Exception as e:
        raise RedirectError(f"bcc could not compile {src}: {e} (compiler messages are on stderr)") from e


def bpfsys_table_fd(bpf: Any, name: str) -> int:
    """Map fd of a bcc table, also for types bcc's Python side cannot wrap (sockmap)."""
    from bcc.libbcc import lib

    fd = int(lib.bpf_table_fd(bpf.module, name.encode()))
    if fd < 0:
        raise RedirectError(f"no map {name!r} in the BPF object")
    return fd
