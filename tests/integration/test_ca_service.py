"""The CA over real gRPC and real TLS on 127.0.0.1: issuing, refusing, and recovering from bad requests."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import signal
import ssl
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from google.protobuf import struct_pb2

from agent.ca.authority import DEFAULT_TTL, MAX_TTL, CertificateAuthority
from agent.ca.service import ServingCertificate, ca_identity
from agent.identity import ca_pb2
from agent.identity.ca_client import CA_SERVER_NAME, CaClient, CaRequestError
from agent.identity.keys import key_pem, make_csr, new_key
from agent.rpc import StatusCode
from hbone.identity import SpiffeId, WorkloadCertificate, identity_of
from tests.fixtures.ca_lab import PODS, TOKENS, Lab, ManualTime, csr_with_key, pod, rewrite, running_ca, write_pods
from tests.fixtures.repo import REPO


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[Lab]:
    async with running_ca(tmp_path) as lab:
        yield lab


async def fetch(lab: Lab, identity: SpiffeId | None, *, token: str = "token-of-node-a",
                validity: dt.timedelta | None = None, csr_for: SpiffeId | None = None
                ) -> tuple[list[bytes], bytes]:
    """Ask the lab's CA through CaClient; returns the chain and the private key PEM."""
    key = new_key()
    csr = make_csr(csr_for or identity or lab.identity("shop", "web"), key)
    client = lab.client(token)
    try:
        return await client.create_certificate(csr, identity, validity), key_pem(key)
    finally:
        await client.close()


async def refused(lab: Lab, identity: SpiffeId | None, **kw: object) -> CaRequestError:
    with pytest.raises(CaRequestError) as e:
        await fetch(lab, identity, **kw)  # type: ignore[arg-type]
    return e.value


async def assert_still_serving(lab: Lab) -> None:
    chain, _ = await fetch(lab, lab.identity("shop", "web"))
    assert identity_of(x509.load_pem_x509_certificate(chain[0])) == lab.identity("shop", "web")


async def test_issues_a_chain_that_verifies_against_the_root(lab: Lab) -> None:
    web = lab.identity("shop", "web")
    chain, key = await fetch(lab, web)
    assert len(chain) == 2
    assert chain[-1] == lab.authority.root_pem  # root last
    leaf = x509.load_pem_x509_certificate(chain[0])
    leaf.verify_directly_issued_by(lab.authority.root_cert)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [str(web)]
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert lifetime == DEFAULT_TTL + dt.timedelta(minutes=1)  # 24 h, backdated one minute for clock skew
    cert = WorkloadCertificate.from_pem(chain[0], key)  # the key we made matches the certificate
    assert cert.identity == web


async def test_requested_validity_is_honoured_and_capped(lab: Lab) -> None:
    web = lab.identity("shop", "web")
    chain, _ = await fetch(lab, web, validity=dt.timedelta(hours=1))
    leaf = x509.load_pem_x509_certificate(chain[0])
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == dt.timedelta(hours=1, minutes=1)
    chain, _ = await fetch(lab, web, validity=dt.timedelta(days=10_000))
    leaf = x509.load_pem_x509_certificate(chain[0])
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == MAX_TTL + dt.timedelta(minutes=1)


async def test_identity_comes_from_the_csr_without_impersonation(lab: Lab) -> None:
    chain, _ = await fetch(lab, None, csr_for=lab.identity("misc", "default"))
    assert identity_of(x509.load_pem_x509_certificate(chain[0])) == lab.identity("misc", "default")
    err = await refused(lab, None, csr_for=lab.identity("shop", "db"))
    assert err.code == StatusCode.PERMISSION_DENIED


async def test_missing_or_wrong_token_is_unauthenticated(lab: Lab) -> None:
    web = lab.identity("shop", "web")
    request = ca_pb2.IstioCertificateRequest(csr=make_csr(web, new_key()).decode())
    for metadata in [(), (("authorization", "Basic dXNlcjpwdw=="),), (("authorization", "Bearer "),),
                     (("authorization", "Bearer token-of-node-a"), ("authorization", "Bearer token-of-node-b"))]:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await lab.raw_call(request, metadata)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
        assert "authorization" in (e.value.details() or "")
    err = await refused(lab, web, token="not-a-token")
    assert err.code == StatusCode.UNAUTHENTICATED
    assert "unknown bearer token" in err.details
    await assert_still_serving(lab)


async def test_identity_of_a_pod_on_another_node_is_denied(lab: Lab) -> None:
    db = lab.identity("shop", "db")  # runs on node-b
    err = await refused(lab, db)
    assert err.code == StatusCode.PERMISSION_DENIED
    assert "node-a" in err.details and str(db) in err.details
    chain, _ = await fetch(lab, db, token="token-of-node-b")  # its own node may
    assert identity_of(x509.load_pem_x509_certificate(chain[0])) == db
    err = await refused(lab, lab.identity("shop", "batch"))  # finished pod
    assert err.code == StatusCode.PERMISSION_DENIED
    await assert_still_serving(lab)


def _request(csr: bytes | str, identity: str | None = None, validity: int = 0,
             metadata: struct_pb2.Struct | None = None) -> ca_pb2.IstioCertificateRequest:
    if metadata is None and identity is not None:
        metadata = struct_pb2.Struct()
        metadata.update({"ImpersonatedIdentity": identity})
    return ca_pb2.IstioCertificateRequest(csr=csr if isinstance(csr, str) else csr.decode(),
                                          validity_duration=validity, metadata=metadata)


WEB = "spiffe://cluster.local/ns/shop/sa/web"


def _bad_requests() -> list[tuple[str, ca_pb2.IstioCertificateRequest, str]]:
    web = SpiffeId.parse(WEB)
    good_csr = make_csr(web, new_key())
    not_spiffe = x509.SubjectAlternativeName([x509.UniformResourceIdentifier("https://example.com/x")])
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.serialization import Encoding
    csr_two_uris = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
                    .add_extension(x509.SubjectAlternativeName([*not_spiffe, x509.UniformResourceIdentifier(WEB)]),
                                   critical=True).sign(new_key(), hashes.SHA256())).public_bytes(Encoding.PEM)
    number = struct_pb2.Struct()
    number.update({"ImpersonatedIdentity": 42})
    return [
        ("empty CSR", _request("", WEB), "csr is empty"),
        ("garbage CSR", _request("-----BEGIN CERTIFICATE REQUEST-----\ngarbage\n-----END CERTIFICATE REQUEST-----\n",
                                 WEB), "not a PEM certificate request"),
        ("CSR for another identity", _request(make_csr(SpiffeId.parse(WEB.replace("web", "other")), new_key()),
                                              WEB), "CSR asks for"),
        ("RSA key", _request(csr_with_key(rsa.generate_private_key(65537, 2048), web), WEB), "ECDSA P-256"),
        ("P-384 key", _request(csr_with_key(ec.generate_private_key(ec.SECP384R1()), web), WEB), "ECDSA P-256"),
        ("wrong trust domain", _request(good_csr, WEB.replace("cluster.local", "evil.example")),
         "outside trust domain 'cluster.local'"),
        ("identity not SPIFFE", _request(good_csr, "spiffe://cluster.local/web"), "not a workload SPIFFE ID"),
        ("identity not a string", _request(good_csr, metadata=number), "must be a string"),
        ("CSR with two URIs", _request(csr_two_uris), "2 URI SANs"),
        ("negative validity", _request(good_csr, WEB, validity=-60), "validity_duration must be >= 0"),
    ]


@pytest.mark.parametrize(("case", "request_", "message"), _bad_requests(), ids=[c[0] for c in _bad_requests()])
async def test_bad_requests_are_invalid_argument_and_the_ca_keeps_serving(
        lab: Lab, case: str, request_: ca_pb2.IstioCertificateRequest, message: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await lab.raw_call(request_, (("authorization", "Bearer token-of-node-a"),))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (case, e.value.details())
    assert message in (e.value.details() or ""), (case, e.value.details())
    await assert_still_serving(lab)


async def test_pod_file_changes_are_seen(lab: Lab) -> None:
    cart = lab.identity("shop", "cart")
    assert (await refused(lab, cart)).code == StatusCode.PERMISSION_DENIED
    write_pods(lab.pods, [*PODS, pod("cart-1", "shop", "node-a", "cart")])
    chain, _ = await fetch(lab, cart)
    assert identity_of(x509.load_pem_x509_certificate(chain[0])) == cart
    write_pods(lab.pods, [*PODS, pod("cart-1", "shop", "node-a", "cart", phase="Failed")])
    assert (await refused(lab, cart)).code == StatusCode.PERMISSION_DENIED


async def test_token_file_changes_are_seen_and_the_client_rereads_its_token(lab: Lab) -> None:
    web = lab.identity("shop", "web")
    token_path = lab.token_file("fresh-token")
    client = CaClient(lab.address, lab.bundle, token_path)
    try:
        with pytest.raises(CaRequestError) as e:
            await client.create_certificate(make_csr(web, new_key()), web)
        assert e.value.code == StatusCode.UNAUTHENTICATED
        rewrite(lab.tokens, json.dumps({**TOKENS, "fresh-token": "node-a"}))
        assert len(await client.create_certificate(make_csr(web, new_key()), web)) == 2
        rewrite(token_path, "token-of-node-b")  # the agent's token was rotated: node-b now
        with pytest.raises(CaRequestError) as e:
            await client.create_certificate(make_csr(web, new_key()), web)
        assert e.value.code == StatusCode.PERMISSION_DENIED and "node-b" in e.value.details
        rewrite(lab.tokens, json.dumps({"token-of-node-a": "node-a"}))  # node-b's token revoked
        with pytest.raises(CaRequestError) as e:
            await client.create_certificate(make_csr(web, new_key()), web)
        assert e.value.code == StatusCode.UNAUTHENTICATED
    finally:
        await client.close()


async def test_unreadable_pod_file_is_unavailable_not_a_crash(tmp_path: Path) -> None:
    async with running_ca(tmp_path) as lab:
        lab.pods.unlink()
        err = await refused(lab, lab.identity("shop", "web"))
        assert err.code == StatusCode.UNAVAILABLE
        write_pods(lab.pods, PODS)
        await assert_still_serving(lab)


async def test_client_refuses_a_ca_outside_its_trust_bundle(lab: Lab) -> None:
    stranger = CertificateAuthority.create("cluster.local")
    client = lab.client(bundle=stranger.trust_bundle)
    web = lab.identity("shop", "web")
    try:
        with pytest.raises(CaRequestError) as e:
            await client.create_certificate(make_csr(web, new_key()), web)
        assert e.value.code == StatusCode.UNAVAILABLE
    finally:
        await client.close()


async def test_ca_presents_its_spiffe_identity_and_dns_name(lab: Lab) -> None:
    ctx = ssl.create_default_context(cadata=lab.authority.root_pem.decode())
    ctx.set_alpn_protocols(["h2"])
    _, writer = await asyncio.open_connection("127.0.0.1", lab.server.port, ssl=ctx,
                                              server_hostname=CA_SERVER_NAME)  # checks the DNS SAN
    try:
        tls = writer.get_extra_info("ssl_object")
        assert tls.version() == "TLSv1.3"
        cert = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
        assert identity_of(cert) == ca_identity("cluster.local")
        assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
            .get_values_for_type(x509.DNSName) == ["ambit-ca.ambit-system.svc"]
    finally:
        writer.transport.abort()  # gRPC does not answer a TLS close_notify; no need to wait for one


def test_serving_certificate_renews_at_half_life_and_on_root_change() -> None:
    authority = CertificateAuthority.create("cluster.local")
    time = ManualTime()
    authority.clock = time.clock
    serving = ServingCertificate(authority, clock=time.clock)
    first = serving.current
    assert serving.fetch() is None
    time.now = first.refresh_at - dt.timedelta(seconds=1)
    assert serving.fetch() is None
    time.now = first.refresh_at
    assert serving.fetch() is not None
    second = serving.current
    assert second.not_after > first.not_after
    assert serving.fetch() is None
    rotated = CertificateAuthority.create("cluster.local")
    authority.root_cert, authority.root_key = rotated.root_cert, rotated.root_key
    assert serving.fetch() is not None
    x509.load_pem_x509_certificate(serving.current.chain_pem).verify_directly_issued_by(rotated.root_cert)


async def test_python_m_agent_ca_runs_the_ca(tmp_path: Path) -> None:
    tokens, pods = tmp_path / "tokens.yaml", tmp_path / "pods.yaml"
    rewrite(tokens, "token-of-node-a: node-a\n")
    write_pods(pods, PODS)
    ca_dir = tmp_path / "ca"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent.ca", "--dir", str(ca_dir), "--trust-domain", "lab.local",
        "--listen", "127.0.0.1:0", "--tokens", str(tokens), "--pods", str(pods), "--log-level", "WARNING",
        cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert "serving lab.local on port" in line, line
        port = int(line.split("on port ")[1].split(";")[0])
        assert (ca_dir / "root-key.pem").stat().st_mode & 0o777 == 0o600
        assert (ca_dir / "root-cert.pem").exists()  # the trust bundle node agents are given
        authority = CertificateAuthority.load(ca_dir, "lab.local")
        web = SpiffeId("lab.local", "shop", "web")
        token = tmp_path / "token"
        rewrite(token, "token-of-node-a")
        client = CaClient(f"127.0.0.1:{port}", authority.trust_bundle, token)
        try:
            chain = await client.create_certificate(make_csr(web, new_key()), web)
        finally:
            await client.close()
        x509.load_pem_x509_certificate(chain[0]).verify_directly_issued_by(authority.root_cert)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    # A restart loads the same root instead of making a new one.
    assert CertificateAuthority.load_or_create(ca_dir, "lab.local").root_pem == authority.root_pem
