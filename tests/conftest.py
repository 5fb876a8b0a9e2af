"""Shared fixtures: a real CA and real workload certificates for every TLS test."""

from __future__ import annotations

import pytest

from agent.ca.authority import CertificateAuthority
from hbone.identity import WorkloadCertificate
from tests.fixtures.certificates import TRUST_DOMAIN, spiffe


@pytest.fixture(scope="session")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create(TRUST_DOMAIN)


@pytest.fixture(scope="session")
def client_cert(ca: CertificateAuthority) -> WorkloadCertificate:
    return ca.issue(spiffe("default", "client"))


@pytest.fixture(scope="session")
def server_cert(ca: CertificateAuthority) -> WorkloadCertificate:
    return ca.issue(spiffe("default", "server"))


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, object]:
    """Run async tests on uvloop, the loop the agent runs on."""
    import uvloop

    return {"uvloop": uvloop.new_event_loop}
