"""Putting the tc programs on interfaces: tcx links pinned in bpffs, or clsact filters (rtnetlink, ``rtnl``).

Both kinds outlive the agent process (a pin keeps a tcx link; a tc filter is owned by the qdisc), which is
what makes enrolled pods fail closed while the agent is down. Both can be listed again by a restarted
agent, so `Redirector.reconcile()` can replace programs in place and remove leftovers:
  - tcx: one pin per interface and direction, `<pin_dir>/tcx-<ifindex>` (ingress) and
    `<pin_dir>/tcx-egress-<ifindex>`; a restarted agent swaps the program with BPF_LINK_UPDATE (atomic), a
    stale pin (device gone) is unpinned;
  - clsact: a bpf filter at a fixed (prio, handle) on the ingress or egress hook, named after the program
    (`ambit_*`); "replace" swaps the program atomically, so there is never a duplicate.
"""

from __future__ import annotations

import contextlib
import errno
import os
from dataclasses import dataclass
from typing import Literal

from agent.capture import bpfsys
from agent.capture import netns as netns_mod
from agent.capture.rtnl import Filter, Rtnl

Backend = Literal["tcx", "clsact"]
Direction = Literal["ingress", "egress"]
DIRECTIONS: tuple[Direction, ...] = ("ingress", "egress")
PROG_PREFIX = "ambit_"
CLSACT_INGRESS = 0xFFFFFFF2
CLSACT_EGRESS = 0xFFFFFFF3
CLSACT_PARENT: dict[Direction, int] = {"ingress": CLSACT_INGRESS, "egress": CLSACT_EGRESS}
TCX_ATTACH_TYPE: dict[Direction, int] = {"ingress": bpfsys.BPF_TCX_INGRESS, "egress": bpfsys.BPF_TCX_EGRESS}
TCX_PIN_PREFIX: dict[Direction, str] = {"ingress": "tcx-", "egress": "tcx-egress-"}
FILTER_PRIO = 1
FILTER_HANDLE = 0x539


@dataclass(frozen=True)
class Attachment:
    """One of our programs on an interface's ingress or egress hook."""

    ifindex: int
    backend: Backend
    prog_name: str
    ident: str  # tcx: pin path; clsact: "prio:handle"
    direction: Direction = "ingress"


class Clsact:
    """bpf filters on the clsact hooks (works on every kernel with cls_bpf)."""

    def __init__(self, rtnl: Rtnl) -> None:
        self.rtnl = rtnl

    def attach(self, ifindex: int, prog_fd: int, prog_name: str, direction: Direction = "ingress") -> None:
        """Install or atomically replace our filter on `ifindex`'s `direction` hook."""
        try:
            self.rtnl.clsact(True, ifindex)
        except OSError as e:
            if e.errno != errno.EEXIST:
                raise
        self.rtnl.bpf_filter(ifindex, CLSACT_PARENT[direction], FILTER_PRIO, FILTER_HANDLE, prog_fd, prog_name)

    def _filters(self, ifindex: int, direction: Direction) -> list[Filter]:
        try:
            return self.rtnl.filters(ifindex, CLSACT_PARENT[direction])
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.ENODEV, errno.ENOENT):
                return []  # no clsact qdisc / device gone
            raise

    def list(self, ifindexes: list[int]) -> list[Attachment]:
        """Our filters (any prio/handle, so duplicates left by someone else show up too)."""
        found = []
        for ifindex in ifindexes:
            for direction in DIRECTIONS:
                for f in self._filters(ifindex, direction):
                    if f.bpf_name and f.bpf_name.startswith(PROG_PREFIX):
                        found.append(Attachment(ifindex, "clsact", f.bpf_name, f"{f.prio}:{f.handle}", direction))
        return found

    def detach(self, att: Attachment) -> None:
        """Remove one filter; drop the clsact qdisc when nothing else is left on it."""
        prio, handle = (int(x) for x in att.ident.split(":"))
        with contextlib.suppress(OSError):  # gone already (the device, or the filter)
            self.rtnl.del_filter(att.ifindex, CLSACT_PARENT[att.direction], prio, handle)
        if not any(self._filters(att.ifindex, direction) for direction in DIRECTIONS):
            with contextlib.suppress(OSError):
                self.rtnl.clsact(False, att.ifindex)


def _tcx_direction(attach_type: int) -> Direction | None:
    for direction in DIRECTIONS:
        if TCX_ATTACH_TYPE[direction] == attach_type:
            return direction
    return None


class Tcx:
    """tcx links (kernel >= 6.6), first in the interface's chain, pinned so they outlive the agent.

    BPF_LINK_CREATE resolves the ifindex in the calling thread's namespace, so every operation runs
    with the thread inside `netns`."""

    def __init__(self, pin_dir: str, netns: str | None = None) -> None:
        self.pin_dir = pin_dir
        self.netns = netns

    def _path(self, ifindex: int, direction: Direction) -> str:
        return os.path.join(self.pin_dir, f"{TCX_PIN_PREFIX[direction]}{ifindex}")

    def attach(self, ifindex: int, prog_fd: int, prog_name: str, direction: Direction = "ingress") -> None:
        """Create and pin a link, or swap the program of the pinned one for `ifindex` and `direction`."""
        with netns_mod.entered(self.netns):
            self._attach(ifindex, prog_fd, direction)

    def _attach(self, ifindex: int, prog_fd: int, direction: Direction) -> None:
        path = self._path(ifindex, direction)
        if os.path.exists(path):
            fd = bpfsys.obj_get(path)
            try:
                if bpfsys.link_info(fd).target == ifindex:
                    bpfsys.link_update(fd, prog_fd)
                    return
            finally:
                os.close(fd)
            os.unlink(path)  # defunct link of a vanished device that had this ifindex
        os.makedirs(self.pin_dir, exist_ok=True)
        fd = bpfsys.link_create_tcx(prog_fd, ifindex, TCX_ATTACH_TYPE[direction])
        try:
            bpfsys.obj_pin(fd, path)
        except OSError:
            bpfsys.link_detach(fd)
            raise
        finally:
            os.close(fd)

    def list(self) -> tuple[list[Attachment], list[str]]:
        """(live pinned links, pins of defunct links)."""
        live: list[Attachment] = []
        stale: list[str] = []
        try:
            names = sorted(os.listdir(self.pin_dir))
        except FileNotFoundError:
            return live, stale
        for name in names:
            if not name.startswith("tcx-"):
                continue
            path = os.path.join(self.pin_dir, name)
            try:
                fd = bpfsys.obj_get(path)
            except OSError:
                stale.append(path)
                continue
            try:
                info = bpfsys.link_info(fd)
                prog = bpfsys.prog_info_by_id(info.prog_id).name if info.prog_id else ""
            finally:
                os.close(fd)
            direction = _tcx_direction(info.attach_type)
            if info.target == 0 or direction is None or name != f"{TCX_PIN_PREFIX[direction]}{info.target}":
                stale.append(path)
            else:
                live.append(Attachment(info.target, "tcx", prog, path, direction))
        return live, stale

    def detach(self, att: Attachment) -> None:
        """Detach and unpin."""
        self.unpin(att.ident)

    @staticmethod
    def unpin(path: str) -> None:
        """Detach the link behind a pin (if still attached) and remove the pin."""
        with contextlib.suppress(OSError):
            fd = bpfsys.obj_get(path)
            try:
                with contextlib.suppress(OSError):
                    bpfsys.link_detach(fd)
            finally:
                os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def remove_dir(self) -> None:
        """Remove the pin directory if empty."""
        with contextlib.suppress(OSError):
            os.rmdir(self.pin_dir)
