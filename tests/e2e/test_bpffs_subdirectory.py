"""The DaemonSet mounts only the host's /sys/fs/bpf/ambit into the agent (at <dir>/ambit, with --bpffs <dir>),
not the whole bpffs: the agent still pins its tcx links there, where they land in the host's bpffs, and with
a plain directory instead it falls back to clsact filters. Real lab node, real bcc programs."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.capture import bpfsys
from agent.capture.redirector import Redirector, pin_filesystem
from agent.lab import Lab

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, bcc, mounts)"),
    pytest.mark.timeout(120),
]
pytest.importorskip("bcc", reason="Debian's python3-bpfcc is not importable")


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    lab = Lab.up(nodes=1, pods_per_node=1)
    try:
        yield lab
    finally:
        lab.down()


@pytest.fixture
def host_and_container() -> Iterator[tuple[Path, Path]]:
    """A stand-in for the host's bpffs (host/) and the container's view: container/ambit bound to host/ambit,
    container/ itself a plain directory, as in the agent's pod."""
    top = Path(tempfile.mkdtemp(prefix="ambit-test-pins-"))
    host, container = top / "host", top / "container"
    host.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(host)], check=True)
    try:
        (host / "ambit").mkdir()
        (container / "ambit").mkdir(parents=True)
        subprocess.run(["mount", "--bind", str(host / "ambit"), str(container / "ambit")], check=True)
        try:
            yield host, container
        finally:
            subprocess.run(["umount", "-l", str(container / "ambit")], check=False)
    finally:
        subprocess.run(["umount", "-l", str(host)], check=False)
        for d in (container / "ambit", container, host, top):
            d.rmdir()


def test_only_the_ambit_directory_of_bpffs_is_enough_for_tcx(lab: Lab, host_and_container: tuple[Path, Path]) -> None:
    host, container = host_and_container
    assert not bpfsys.is_bpffs(str(container)) and pin_filesystem(str(container)) == str(container / "ambit")
    pod = lab.pods[0]
    r = Redirector(["eth0"], netns=lab.nodes[0].netns, bpffs=str(container), instance="node-x").start()
    try:
        assert r.backend == "tcx"
        r.enroll(pod.ip, pod.host_ifname)
        pins = sorted(p.name for p in (host / "ambit" / "node-x").iterdir())  # seen from the host's side
        assert pins and all(p.startswith("tcx-") for p in pins)
    finally:
        r.close(detach=True)
    assert not (host / "ambit" / "node-x").exists()  # detached and unpinned


def test_a_plain_directory_falls_back_to_clsact(lab: Lab, tmp_path: Path) -> None:
    (tmp_path / "ambit").mkdir()
    r = Redirector(["eth0"], netns=lab.nodes[0].netns, bpffs=str(tmp_path), instance="node-y").start()
    try:
        assert r.backend == "clsact"
    finally:
        r.close(detach=True)
