"""``python -m hbone serve`` as processes: by default, as ztunnel, it relays a CONNECT only to the address the
tunnel connection reached (a 400 otherwise); with ``--any-target`` it relays to any target (a standalone server
in front of other hosts, as the lab benchmark's ``hbone`` path runs it)."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.ca.authority import CertificateAuthority
from bench.ambit import ambit_hbone_client, ambit_hbone_server
from bench.connprofile import cprofile_against, cprofile_top, per_connection
from bench.envoy import TlsFiles
from hbone.identity import WorkloadCertificate
from hbone.profiling import ENV
from tests.fixtures.certificates import TRUST_DOMAIN
from tests.fixtures.envoy_peer import exchange, refused

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def echo_elsewhere() -> Iterator[tuple[str, int]]:
    """An echo server on 127.0.0.2: not the address the HBONE server listens on."""
    server = socket.create_server(("127.0.0.2", 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(10)
                while data := conn.recv(65536):
                    conn.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[:2]
    finally:
        stop.set()
        thread.join(5)
        server.close()


@pytest.mark.parametrize("any_target", [False, True])
def test_serve_relays_to_another_address_only_with_any_target(
        tmp_path: Path, ca: CertificateAuthority, client_cert: WorkloadCertificate,
        server_cert: WorkloadCertificate, echo_elsewhere: tuple[str, int], any_target: bool) -> None:
    server_tls = TlsFiles.write(tmp_path / "tls", "server", server_cert, ca.root_pem)
    client_tls = TlsFiles.write(tmp_path / "tls", "client", client_cert, ca.root_pem)
    authority = f"{echo_elsewhere[0]}:{echo_elsewhere[1]}"
    with (ambit_hbone_server(tmp_path, server_tls, TRUST_DOMAIN, any_target=any_target) as (_, hbone),
          ambit_hbone_client(tmp_path, client_tls, TRUST_DOMAIN, hbone=hbone, authority=authority,
                             expect=server_cert.identity) as (_, entry)):
        if any_target:
            assert exchange(entry, b"through the tunnel", 18) == b"through the tunnel"
        else:
            assert refused(entry)
            assert "is not this connection's destination" in (tmp_path / "ambit-serve.log").read_text()


def test_profiled_on_signals_when_asked_and_compared_per_connection(
        tmp_path: Path, ca: CertificateAuthority, client_cert: WorkloadCertificate,
        server_cert: WorkloadCertificate, echo_elsewhere: tuple[str, int], monkeypatch: pytest.MonkeyPatch) -> None:
    """With AMBIT_CPROFILE set, SIGUSR1 starts cProfile in each process and SIGUSR2 writes what it counted: the
    forwarder's profile names its own connection path, per connection, as ``bench.connprofile`` reads it."""
    out = tmp_path / "profiles"
    out.mkdir()
    (out / "connections").write_text("3")
    monkeypatch.setenv(ENV, str(out))
    server_tls = TlsFiles.write(tmp_path / "tls", "server", server_cert, ca.root_pem)
    client_tls = TlsFiles.write(tmp_path / "tls", "client", client_cert, ca.root_pem)
    with (ambit_hbone_server(tmp_path, server_tls, TRUST_DOMAIN, any_target=True) as (server, hbone),
          ambit_hbone_client(tmp_path, client_tls, TRUST_DOMAIN, hbone=hbone,
                             authority=f"{echo_elsewhere[0]}:{echo_elsewhere[1]}",
                             expect=server_cert.identity) as (client, entry)):
        assert list(out.glob("*.prof")) == []  # nothing profiled until asked
        for pid in (server.pid, client.pid):
            os.kill(pid, signal.SIGUSR1)
        for _ in range(3):
            assert exchange(entry, b"profiled", 8) == b"profiled"
        for pid in (server.pid, client.pid):
            os.kill(pid, signal.SIGUSR2)
        deadline = time.monotonic() + 10
        while len(list(out.glob("hbone-*.prof"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    forwarder = out / f"hbone-{client.pid}.prof"
    costs = per_connection(forwarder)
    calls, own = costs["hbone/forward.py:_tunnel"]
    assert calls >= 1 and own > 0
    assert "hbone/forward.py:_tunnel" in cprofile_top(forwarder, 50)
    against = cprofile_against(forwarder, out / f"hbone-{server.pid}.prof", 50)  # the forwarder's own path: more
    assert "hbone/forward.py:_tunnel" in against.split("...")[0]
