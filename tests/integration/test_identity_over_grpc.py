"""The certificate manager against the real gRPC CA over TLS: coalesced fetches, node authorization, mutual
TLS between the certificates it hands out, and a root rotation with both roots trusted in between."""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
from pathlib import Path

import pytest
from cryptography import x509

from agent.ca.authority import CertificateAuthority
from agent.identity.ca_client import CaClient
from agent.identity.manager import CertificateManager, CertificateUnavailable
from agent.identity.x509ops import verify_chain
from hbone.identity import (
    IdentityError,
    SpiffeId,
    TrustBundle,
    WorkloadCertificate,
    client_context,
    server_context,
    verify_peer,
)
from tests.fixtures.ca_lab import ManualTime, running_ca
from tests.fixtures.certificates import spiffe

WEB = spiffe("shop", "web")
PLAIN = spiffe("misc", "default")


class CountingClient(CaClient):
    """The real gRPC client, counting the RPCs it makes."""

    calls = 0

    async def create_certificate(self, csr_pem: bytes, identity: SpiffeId | None,
                                 validity: dt.timedelta | None = None) -> list[bytes]:
        self.calls += 1
        return await super().create_certificate(csr_pem, identity, validity)



def serial(cert: WorkloadCertificate) -> int:
    return x509.load_pem_x509_certificate(cert.chain_pem).serial_number


async def mtls_exchange(server_cert: WorkloadCertificate, client_cert: WorkloadCertificate,
                        bundle: TrustBundle) -> tuple[SpiffeId, SpiffeId]:
    """A real mutual-TLS connection on 127.0.0.1 with HBONE's contexts; returns (what the client saw,
    what the server saw)."""
    seen: asyncio.Future[SpiffeId] = asyncio.get_running_loop().create_future()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.set_result(verify_peer(writer.get_extra_info("ssl_object"), bundle))
        writer.write(await reader.readexactly(4))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_context(server_cert, bundle))
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_context(client_cert, bundle))
        peer = verify_peer(writer.get_extra_info("ssl_object"), bundle, server_cert.identity)
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        writer.transport.abort()
        return peer, await seen
    finally:
        server.close()


async def test_manager_end_to_end_over_grpc(tmp_path: Path) -> None:
    async with running_ca(tmp_path) as lab:
        time = ManualTime()
        client = CountingClient(lab.address, lab.bundle, lab.token_file("token-of-node-a"))
        manager = CertificateManager(client, lab.bundle, clock=time.clock, sleep=time.sleep)
        try:
            certs = await asyncio.gather(*(manager.get(WEB) for _ in range(20)))
            assert client.calls == 1
            web = certs[0]
            assert all(c is web for c in certs)
            verify_chain(x509.load_pem_x509_certificates(web.chain_pem), lab.bundle.roots_pem)
            plain = await manager.get(PLAIN)
            assert await mtls_exchange(web, plain, manager.trust_bundle) == (WEB, PLAIN)
            with pytest.raises(CertificateUnavailable, match="PERMISSION_DENIED") as e:
                await manager.get(spiffe("shop", "db"))  # runs on node-b
            assert "node-a" in str(e.value)
            assert [s.state for s in manager.status()] == ["available", "unavailable", "available"]
        finally:
            await manager.close()
            await client.close()


async def test_root_rotation(tmp_path: Path) -> None:
    old = CertificateAuthority.create("cluster.local")
    new = CertificateAuthority.create("cluster.local")
    old_bundle = old.trust_bundle
    old_peer = old.issue(spiffe("default", "legacy"))  # a peer still holding a certificate from the old root
    time = ManualTime()
    async with running_ca(tmp_path, old) as lab:
        client = lab.client()
        manager = CertificateManager(client, old_bundle, clock=time.clock, sleep=time.sleep)
        try:
            await manager.get(PLAIN)
            await time.next_sleep()

            # 1. Every node learns the new root next to the old one.
            bundle = manager.update_trust_bundle(new.root_pem)
            assert len(bundle.roots) == 2 and manager.trust_bundle == bundle
            # 2. The CA switches to the new root in place (its serving certificate follows at the next
            #    handshake; from here on ``old`` holds the new root, ``old_bundle`` the old one).
            lab.authority.root_cert, lab.authority.root_key = new.root_cert, new.root_key
            # 3. Certificates now come from the new root, over a channel that trusts both.
            web = await manager.get(WEB)
            await time.next_sleep()
            x509.load_pem_x509_certificate(web.chain_pem).verify_directly_issued_by(new.root_cert)
            verify_chain(x509.load_pem_x509_certificates(lab.server.serving.current.chain_pem),
                         new.root_pem)

            # New-root and old-root certificates talk to each other with the merged bundle...
            assert await mtls_exchange(web, old_peer, bundle) == (WEB, old_peer.identity)
            assert await mtls_exchange(old_peer, web, bundle) == (old_peer.identity, WEB)
            # ...and not with the old root alone.
            with pytest.raises(ssl.SSLCertVerificationError):
                await mtls_exchange(web, old_peer, old_bundle)
            with pytest.raises(IdentityError, match="does not chain"):
                verify_chain(x509.load_pem_x509_certificates(web.chain_pem), old_bundle.roots_pem)

            # 4. The old root is dropped: what it signed is renewed at once, not at half-life.
            plain_before = await manager.get(PLAIN)
            x509.load_pem_x509_certificate(plain_before.chain_pem).verify_directly_issued_by(x509.load_der_x509_certificate(old_bundle.roots[0]))
            manager.update_trust_bundle(new.root_pem, replace=True)
            assert manager.trust_bundle.roots_pem == new.root_pem
            async with asyncio.timeout(10):  # renewed in the background (the clock stands still)
                while (plain := await manager.get(PLAIN)) is plain_before:  # noqa: ASYNC110 (get answers the old one)
                    await asyncio.sleep(0.02)
            assert serial(plain) != serial(plain_before)
            x509.load_pem_x509_certificate(plain.chain_pem).verify_directly_issued_by(new.root_cert)
            assert await manager.get(WEB) is web  # already from the new root: untouched
        finally:
            await manager.close()
            await client.close()
