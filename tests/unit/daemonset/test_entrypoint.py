"""daemonset/entrypoint.py: the kernel-headers strategy on fake host trees, the ConfigMap's settings as the
agent's flags, and the exec that makes the agent the container's process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from daemonset import entrypoint as ep
from tests.fixtures.eventually import eventually_sync
from tests.fixtures.repo import REPO

RELEASE = "6.8.0-31-generic"


def headers_tree(directory: Path, with_common: bool = True) -> Path:
    (directory / "include" / "uapi").mkdir(parents=True)
    if with_common:
        common = directory.parent / directory.name.replace("-amd64", "-common")
        (common / "include").mkdir(parents=True)
    return directory


def test_host_headers_are_used_through_their_absolute_links(tmp_path: Path) -> None:
    host, modules, image_src = tmp_path / "host", tmp_path / "modules", tmp_path / "image-src"
    headers_tree(host / "usr/src" / f"linux-headers-{RELEASE}", with_common=False)
    (host / "lib/modules" / RELEASE).mkdir(parents=True)
    (host / "lib/modules" / RELEASE / "build").symlink_to(f"/usr/src/linux-headers-{RELEASE}")  # as on Ubuntu
    headers_tree(image_src / "linux-headers-6.1.0-28-amd64")

    message = ep.link_kernel_headers(RELEASE, modules, host, image_src)
    assert "the host's headers" in message
    build = modules / RELEASE / "build"
    assert build.resolve() == (host / "usr/src" / f"linux-headers-{RELEASE}").resolve()
    assert (build / "include" / "uapi").is_dir()
    assert (modules / RELEASE / "source").resolve() == build.resolve()  # no source link on the host: build's

    # Already there: left alone.
    assert "already in" in ep.link_kernel_headers(RELEASE, modules, host, image_src)


def test_relative_and_chained_host_links_resolve_inside_the_host_tree(tmp_path: Path) -> None:
    host = tmp_path / "host"
    headers_tree(host / "usr/src" / "linux-headers-6.12.9-amd64")
    mod = host / "lib/modules" / RELEASE
    mod.mkdir(parents=True)
    (mod / "build").symlink_to("../../../usr/src/linux-headers-6.12.9-amd64")  # relative, Debian's own layout
    (mod / "source").symlink_to("/usr/src/linux-headers-6.12.9-common")
    found = ep.find_headers(RELEASE, host, tmp_path / "nothing")
    assert found is not None and found.origin == "host"
    assert found.build == host / "usr/src" / "linux-headers-6.12.9-amd64"
    assert found.source == host / "usr/src" / "linux-headers-6.12.9-common"
    # A link that leaves the mounted tree's content (kind: the node has /lib/modules but not /usr/src) is no use.
    assert ep.resolve_in(host, "/lib/modules/nope/build") is None


def test_without_host_headers_the_images_newest_debian_headers_are_linked(tmp_path: Path) -> None:
    host, modules, image_src = tmp_path / "host", tmp_path / "modules", tmp_path / "image-src"
    (host / "lib/modules" / RELEASE).mkdir(parents=True)
    (host / "lib/modules" / RELEASE / "build").symlink_to(f"/usr/src/linux-headers-{RELEASE}")  # dangling (kind)
    headers_tree(image_src / "linux-headers-6.1.0-9-amd64")
    headers_tree(image_src / "linux-headers-6.1.0-28-amd64")  # newer by version, older by text

    message = ep.link_kernel_headers(RELEASE, modules, host, image_src)
    assert "the image's Debian headers" in message
    assert os.readlink(modules / RELEASE / "build") == str(image_src / "linux-headers-6.1.0-28-amd64")
    assert os.readlink(modules / RELEASE / "source") == str(image_src / "linux-headers-6.1.0-28-common")


def test_no_headers_anywhere_is_said(tmp_path: Path) -> None:
    message = ep.link_kernel_headers(RELEASE, tmp_path / "modules", tmp_path / "host", tmp_path / "src")
    assert message.startswith(f"no kernel headers for {RELEASE}") and "bcc will fail" in message
    assert not (tmp_path / "modules").exists()


def test_fail_open_comes_from_the_config_map_value() -> None:
    base = ["python", "-m", "agent", "run"]
    assert ep.agent_command(base, {"AMBIT_FAIL_OPEN": "true"}) == [*base, "--fail-open"]
    assert ep.agent_command(base, {"AMBIT_FAIL_OPEN": "false"}) == base
    assert ep.agent_command(base, {}) == base
    assert ep.agent_command([*base, "--fail-open"], {"AMBIT_FAIL_OPEN": "1"}) == [*base, "--fail-open"]


def test_the_drain_setting_becomes_the_agents_flag() -> None:
    base = ["python", "-m", "agent", "run", "--node", "n"]
    assert ep.agent_command(base, {"AMBIT_DRAIN_SECONDS": "20"}) == [*base, "--drain-seconds", "20.0"]
    assert ep.agent_command(base, {"AMBIT_DRAIN_SECONDS": "-3"}) == [*base, "--drain-seconds", "0.0"]
    assert ep.agent_command(base, {"AMBIT_DRAIN_SECONDS": "soon"}) == base  # said, and no drain
    assert ep.agent_command([*base, "--drain-seconds", "5"], {"AMBIT_DRAIN_SECONDS": "20"}) == [
        *base, "--drain-seconds", "5"]


def test_the_entrypoint_becomes_the_agent_so_sigterm_reaches_it(tmp_path: Path) -> None:
    """exec: the agent has the container's pid, gets SIGTERM itself (and drains), and its status is the exit."""
    ready = tmp_path / "ready"
    agent = textwrap.dedent(f"""
        import os, signal, sys, time
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(7 if "--drain-seconds" in sys.argv else 9))
        open({str(ready)!r}, "w").write(str(os.getpid()))
        time.sleep(30)
    """)
    env = {**os.environ, "AMBIT_MODULES_DIR": str(tmp_path / "m"), "AMBIT_HOST_ROOT": str(tmp_path / "h"),
           "AMBIT_HEADERS_SRC": str(tmp_path / "s"), "AMBIT_DRAIN_SECONDS": "20"}
    proc = subprocess.Popen([sys.executable, str(REPO / "daemonset" / "entrypoint.py"), "--", sys.executable, "-c",
                             agent], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        eventually_sync(ready.exists, "the agent's ready file", 20, interval=0.05)
        assert int(ready.read_text()) == proc.pid  # the same process: exec, no supervisor
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 7
    finally:
        proc.kill()


def test_an_agent_that_exits_by_itself_ends_the_container_with_its_status(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(REPO / "daemonset" / "entrypoint.py"), "--", sys.executable, "-c",
                          "import sys; sys.exit(3)"], capture_output=True, text=True, timeout=30, check=False,
                         env={**os.environ, "AMBIT_MODULES_DIR": str(tmp_path / "m"),
                              "AMBIT_HOST_ROOT": str(tmp_path / "h"), "AMBIT_HEADERS_SRC": str(tmp_path / "s")})
    assert out.returncode == 3
    assert ep.main([], {}) == 2  # no command: usage
