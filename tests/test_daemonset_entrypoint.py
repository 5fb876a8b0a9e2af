"""daemonset/entrypoint.py: the kernel-headers strategy on fake host trees, --fail-open from the ConfigMap, and
the drain on SIGTERM with a real child process and a real admin endpoint."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from daemonset import entrypoint as ep

REPO = Path(__file__).resolve().parent.parent
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


# -- the drain, with a real child: an "agent" serving /config_dump whose connection count the test controls ---
FAKE_AGENT = textwrap.dedent("""
    import http.server, json, signal, sys, threading, time
    from pathlib import Path
    state, port, ready, stopped = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"connections": int(state.read_text())}).encode()
            self.send_response(200); self.end_headers(); self.wfile.write(body)
        def log_message(self, *a): pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    def stop(signum, frame):
        stopped.write_text(repr(time.monotonic()))
        sys.exit(7)
    signal.signal(signal.SIGTERM, stop)
    print("fake agent argv", sys.argv[5:], flush=True)
    ready.write_text("up")
    while True:
        time.sleep(0.05)
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Drained:
    """The entrypoint running a fake agent that reports ``count`` (a file the test writes) proxied connections
    and records when it got SIGTERM (time.monotonic, comparable across processes)."""

    def __init__(self, tmp_path: Path, drain: float, extra_env: dict[str, str] | None = None) -> None:
        self.tmp_path = tmp_path
        self.count, self.ready, self.stopped = tmp_path / "count", tmp_path / "ready", tmp_path / "stopped"
        self.count.write_text("2")
        self.script = tmp_path / "fake_agent.py"
        self.script.write_text(FAKE_AGENT)
        self.env = {**os.environ, "AMBIT_DRAIN_SECONDS": str(drain),
                    "AMBIT_MODULES_DIR": str(tmp_path / "modules"), "AMBIT_HOST_ROOT": str(tmp_path / "host"),
                    "AMBIT_HEADERS_SRC": str(tmp_path / "src"), **(extra_env or {})}
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> subprocess.Popen[str]:
        port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "daemonset" / "entrypoint.py"), "--", sys.executable, str(self.script),
             str(self.count), str(port), str(self.ready), str(self.stopped), "--node=n1"],
            env={**self.env, "AMBIT_ADMIN_URL": f"http://127.0.0.1:{port}"},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 10
        while not self.ready.exists():
            assert self.proc.poll() is None, self.proc.communicate()[0]
            assert time.monotonic() < deadline, "the fake agent did not start"
            time.sleep(0.02)
        return self.proc

    def finish(self, timeout: float = 15) -> tuple[int, str]:
        assert self.proc is not None
        out, _ = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out


@pytest.fixture
def drained(tmp_path: Path) -> Drained:
    return Drained(tmp_path, drain=10)


def test_sigterm_waits_until_the_proxied_connections_end(drained: Drained) -> None:
    proc = drained.start()
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    time.sleep(1.5)
    assert not drained.stopped.exists(), "the agent was stopped while it still carried connections"
    drained.count.write_text("0")
    ended = time.monotonic()
    code, out = drained.finish()
    assert code == 7  # the agent's own exit status
    assert float(drained.stopped.read_text()) - ended < 2.5  # stopped at the next poll
    assert "draining: 2 proxied connection(s)" in out and "no proxied connections left" in out
    assert "fake agent argv ['--node=n1']" in out
    assert "no kernel headers" in out  # the header step ran first, and said what it found


def test_the_drain_ends_after_its_period(tmp_path: Path) -> None:
    drained = Drained(tmp_path, drain=1.0, extra_env={"AMBIT_FAIL_OPEN": "true"})
    proc = drained.start()
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code, out = drained.finish()
    assert code == 7
    assert 0.9 <= float(drained.stopped.read_text()) - started < 4
    assert "drain period over with 2 proxied connection(s) left" in out
    assert "'--fail-open'" in out


def test_a_second_signal_ends_the_drain_at_once(drained: Drained) -> None:
    proc = drained.start()
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    code, out = drained.finish()
    assert code == 7 and float(drained.stopped.read_text()) - sent < 2.5
    assert "second signal" in out


def test_an_agent_that_exits_by_itself_ends_the_container_with_its_status(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(REPO / "daemonset" / "entrypoint.py"), "--", sys.executable, "-c",
                          "import sys; sys.exit(3)"], capture_output=True, text=True, timeout=30, check=False,
                         env={**os.environ, "AMBIT_MODULES_DIR": str(tmp_path / "m"),
                              "AMBIT_HOST_ROOT": str(tmp_path / "h"), "AMBIT_HEADERS_SRC": str(tmp_path / "s")})
    assert out.returncode == 3
    assert ep.main([], {}) == 2  # no command: usage
