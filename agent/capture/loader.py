"""Compiling and loading bpf/redirect.c in a short-lived process, so the agent never maps LLVM and clang.

bcc compiles C in-process through libbcc, which maps libLLVM and libclang (some 85 MB) for the life of the
process that imports it. The agent instead runs ``python -m agent.capture.loader`` once at start: it
compiles and loads the programs with bcc (still "loads C eBPF programs through bcc"), hands the programs'
and maps' file descriptors to the agent over a unix socket (SCM_RIGHTS) and exits. The kernel objects live on
as long as the agent holds them (and attached programs hold theirs), and no bpffs is needed.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass

from agent.capture.programs import DOOR_PROG, LOOKUP_PROG, POD_PROG, UPLINK_PROG, RedirectError

MAPS = ("config", "enrolled", "ifaces", "bridge_ports", "probe_ports", "flows", "counters", "events", "listeners")
PROGRAMS = (POD_PROG, UPLINK_PROG, DOOR_PROG, LOOKUP_PROG)
LOAD_TIMEOUT = 120.0


@dataclass
class Loaded:
    """File descriptors of the loaded programs and maps, owned by the caller (``close`` them)."""

    programs: dict[str, int]
    maps: dict[str, int]

    def close(self) -> None:
        for fd in [*self.programs.values(), *self.maps.values()]:
            os.close(fd)
        self.programs.clear()
        self.maps.clear()


def load(ringbuf_pages: int, timeout: float = LOAD_TIMEOUT) -> Loaded:
    """Run the loader process and take the objects it loaded; RedirectError naming what went wrong."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with parent:
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "agent.capture.loader", "--socket-fd", str(child.fileno()),
                 "--ringbuf-pages", str(ringbuf_pages)],
                pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE)
        finally:
            child.close()
        try:
            parent.settimeout(timeout)
            message, fds, _flags, _addr = socket.recv_fds(parent, 65536, len(PROGRAMS) + len(MAPS))
            _out, err = proc.communicate(timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as e:
            proc.kill()
            proc.wait()
            raise RedirectError(f"the eBPF loader did not answer: {e}") from None
    if proc.returncode != 0 or not message:
        for fd in fds:
            os.close(fd)
        raise RedirectError(err.decode(errors="replace").strip().splitlines()[-1] if err.strip()
                            else f"the eBPF loader exited with {proc.returncode}")
    names = json.loads(message)
    objects = dict(zip(names, fds, strict=True))
    return Loaded({n: objects[n] for n in PROGRAMS}, {n: objects[n] for n in MAPS})


def _serve(sock_fd: int, ringbuf_pages: int) -> int:
    from bcc import BPF  # only here: this process is short-lived

    from agent.capture import bpfsys
    from agent.capture.programs import bpfsys_table_fd, compile_programs

    with socket.socket(fileno=sock_fd) as sock:
        try:
            b = compile_programs([f"-DAMBIT_RINGBUF_PAGES={ringbuf_pages}"])
            fds = {name: b.load_func(name.encode(), BPF.SCHED_CLS).fd for name in (POD_PROG, UPLINK_PROG, DOOR_PROG)}
            fds |= {LOOKUP_PROG: b.load_func(LOOKUP_PROG.encode(), bpfsys.BPF_PROG_TYPE_SK_LOOKUP,
                                            attach_type=bpfsys.BPF_SK_LOOKUP).fd}
            fds |= {name: bpfsys_table_fd(b, name) for name in MAPS}
        except RedirectError as e:
            print(f"ambit eBPF loader: {e}", file=sys.stderr)
            return 1
        names = list(fds)
        socket.send_fds(sock, [json.dumps(names).encode()], [fds[n] for n in names])
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m agent.capture.loader", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--socket-fd", type=int, required=True, help="unix socket to send the descriptors on")
    ap.add_argument("--ringbuf-pages", type=int, default=64)
    args = ap.parse_args(argv)
    return _serve(args.socket_fd, args.ringbuf_pages)


if __name__ == "__main__":
    sys.exit(main())
