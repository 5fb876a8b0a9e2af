"""Shared fixtures: a real CA and real workload certificates for every TLS test."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.ca.authority import CertificateAuthority
from agent.ca.issue import CA_FILE, CERT_FILE, KEY_FILE, issue
from agent.telemetry.observer_tls import ClientTlsFiles, ServerTls, ServerTlsFiles, operator_identity
from hbone.identity import WorkloadCertificate
from tests.fixtures.certificates import TRUST_DOMAIN, spiffe


@pytest.fixture
def no_collector() -> Iterator[None]:
    """Memory must go when the last reference does: the cyclic collector is kept out of it (what a reference cycle
    holds stays)."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.fixture(scope="session")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create(TRUST_DOMAIN)


@pytest.fixture(scope="session")
def client_cert(ca: CertificateAuthority) -> WorkloadCertificate:
    return ca.issue(spiffe("default", "client"))


@pytest.fixture(scope="session")
def server_cert(ca: CertificateAuthority) -> WorkloadCertificate:
    return ca.issue(spiffe("default", "server"))


@dataclass(frozen=True)
class ObserverTlsMaterial:
    """An Observer's server files and the operator's client files, issued by ``ambit ca --issue``'s code."""

    server: ServerTlsFiles
    operator: ClientTlsFiles

    def server_tls(self) -> ServerTls:
        return ServerTls(self.server, [operator_identity(TRUST_DOMAIN)])

    def observe_args(self) -> list[str]:
        """``ambit observe``'s flags for the operator's certificate."""
        return ["--tls-client-cert-file", str(self.operator.cert), "--tls-client-key-file", str(self.operator.key),
                "--tls-ca-cert-files", str(self.operator.cas[0])]


def issue_observer_tls(ca: CertificateAuthority, directory: Path) -> ObserverTlsMaterial:
    issue(ca, "observer", directory / "observer")
    issue(ca, "operator", directory / "operator")
    server, op = directory / "observer", directory / "operator"
    return ObserverTlsMaterial(ServerTlsFiles(server / CERT_FILE, server / KEY_FILE, (server / CA_FILE,)),
                               ClientTlsFiles((op / CA_FILE,), op / CERT_FILE, op / KEY_FILE))


@pytest.fixture(scope="session")
def observer_tls(ca: CertificateAuthority, tmp_path_factory: pytest.TempPathFactory) -> ObserverTlsMaterial:
    return issue_observer_tls(ca, tmp_path_factory.mktemp("observer-tls"))


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, object]:
    """Run async tests on uvloop, the loop the agent runs on."""
    import uvloop

    return {"uvloop": uvloop.new_event_loop}
