"""The x509 worker process: keys and CSRs for an identity, chain checks against a bundle's roots, errors as
IdentityError; it starts on demand, ends when idle, and a dead worker fails one request, not the next."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.ca.authority import CertificateAuthority
from agent.identity.worker import X509Worker
from hbone.identity import IdentityError, WorkloadCertificate
from tests.fixtures.certificates import spiffe

WEB = spiffe("shop", "web")


async def test_a_key_and_a_csr_for_the_identity() -> None:
    worker = X509Worker()
    try:
        key_pem, csr_pem = await worker.csr(WEB)
        csr = x509.load_pem_x509_csr(csr_pem)
        assert csr.is_signature_valid
        key = serialization.load_pem_private_key(key_pem, password=None)
        assert csr.public_key() == key.public_key()
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        assert san.critical and san.value.get_values_for_type(x509.UniformResourceIdentifier) == [str(WEB)]
        authority = CertificateAuthority.create("cluster.local")  # what the CA signs, the agent can use
        chain = b"".join(authority.sign_csr(csr_pem, WEB)[:-1])  # without the root, as the agent presents it
        assert WorkloadCertificate.from_pem(chain, key_pem).identity == WEB
        second_key, _ = await worker.csr(WEB)
        assert second_key != key_pem and worker.started == 1  # a new key each time, from the same worker
    finally:
        await worker.close()


async def test_chains_are_checked_against_the_roots() -> None:
    ours, theirs = CertificateAuthority.create("cluster.local"), CertificateAuthority.create("cluster.local")
    cert = ours.issue(WEB)
    worker = X509Worker()
    try:
        await worker.verify(cert.chain_pem, ours.root_pem)
        await worker.verify(cert.chain_pem, theirs.root_pem + ours.root_pem)  # a bundle during a root rotation
        with pytest.raises(IdentityError, match="does not chain to any of the 1 root"):
            await worker.verify(cert.chain_pem, theirs.root_pem)
        with pytest.raises(IdentityError):
            await worker.verify(b"not a certificate", ours.root_pem)
        await worker.verify(cert.chain_pem, ours.root_pem)  # the worker serves on after a bad request
        assert worker.started == 1
    finally:
        await worker.close()


async def test_it_ends_when_idle_and_starts_again_on_demand() -> None:
    worker = X509Worker(idle=0.2)
    try:
        await worker.csr(WEB)
        assert worker.running
        for _ in range(100):  # bounded: 5 s
            if not worker.running:
                break
            await asyncio.sleep(0.05)
        assert not worker.running, "the worker did not end after 0.2 s idle"
        await worker.csr(WEB)
        assert worker.started == 2
    finally:
        await worker.close()
    assert not worker.running


async def test_a_hung_worker_fails_one_request_is_killed_and_the_next_gets_a_new_one() -> None:
    worker = X509Worker(timeout=0.5)
    try:
        await worker.csr(WEB)
        proc = worker._proc
        assert proc is not None
        os.kill(proc.pid, signal.SIGSTOP)
        with pytest.raises(IdentityError, match="the x509 worker failed: TimeoutError"):
            await worker.csr(WEB)
        assert proc.returncode == -signal.SIGKILL
        key_pem, _ = await worker.csr(WEB)
        assert b"PRIVATE KEY" in key_pem and worker.started == 2
    finally:
        await worker.close()


async def test_a_worker_that_died_while_idle_is_replaced() -> None:
    worker = X509Worker()
    try:
        await worker.csr(WEB)
        proc = worker._proc
        assert proc is not None
        os.kill(proc.pid, signal.SIGKILL)
        await proc.wait()
        key_pem, _ = await worker.csr(WEB)
        assert b"PRIVATE KEY" in key_pem and worker.started == 2
    finally:
        await worker.close()
