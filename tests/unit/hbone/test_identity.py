"""Workload identity: SPIFFE IDs are matched whole (nothing may follow the service account, not even a newline),
key pairs are checked by OpenSSL, and the mesh's TLS objects read and write without Python wrappers."""

from __future__ import annotations

import contextlib
import datetime as dt
import inspect
import ssl
from typing import cast

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.ca.authority import CertificateAuthority
from hbone import IdentityError, SpiffeId, identity_of
from hbone.identity import (
    KeyMismatchError,
    WorkloadCertificate,
    check_key_pair,
    client_context,
    server_context,
    verify_peer,
)

GOOD = "spiffe://cluster.local/ns/default/sa/web"


def test_a_workload_id_parses() -> None:
    assert SpiffeId.parse(GOOD) == SpiffeId("cluster.local", "default", "web")
    assert str(SpiffeId.parse(GOOD)) == GOOD


@pytest.mark.parametrize("suffix", ["\n", "\r\n", "\nspiffe://evil/ns/x/sa/y", " ", "/extra"])
def test_anything_after_the_service_account_is_refused(suffix: str) -> None:
    with pytest.raises(IdentityError, match="not a workload SPIFFE ID"):
        SpiffeId.parse(GOOD + suffix)


def _cert_with_uri(uri: str) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "test")])
    now = dt.datetime.now(dt.UTC)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False)
            .sign(key, hashes.SHA256()))


def test_a_certificate_whose_uri_san_ends_in_a_newline_has_no_identity() -> None:
    assert identity_of(_cert_with_uri(GOOD)) == SpiffeId("cluster.local", "default", "web")
    with pytest.raises(IdentityError, match="not a workload SPIFFE ID"):
        identity_of(_cert_with_uri(GOOD + "\n"))


def test_a_key_pair_is_checked_by_openssl_without_asking_for_a_password() -> None:
    authority = CertificateAuthority.create("cluster.local")
    web, db = authority.issue(SpiffeId.parse(GOOD)), authority.issue(SpiffeId("cluster.local", "default", "db"))
    check_key_pair(web.chain_pem, web.key_pem)
    with pytest.raises(KeyMismatchError, match="does not match"):
        check_key_pair(web.chain_pem, db.key_pem)
    key = serialization.load_pem_private_key(web.key_pem, password=None)
    encrypted = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.BestAvailableEncryption(b"secret"))
    with pytest.raises(IdentityError, match="does not load") as e:  # no prompt on a terminal: a clear error
        check_key_pair(web.chain_pem, encrypted)
    assert not isinstance(e.value, KeyMismatchError)


def test_mesh_tls_objects_read_and_write_without_python_wrappers(ca: CertificateAuthority,
                                                                client_cert: WorkloadCertificate,
                                                                server_cert: WorkloadCertificate) -> None:
    """uvloop's TLS transport calls read, write and pending of the context's SSLObject per record: they are the
    OpenSSL object's own methods, and a handshake and data both ways work through them (memory BIOs), including
    read into a buffer and a read that finds nothing yet."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_context(client_cert, ca.trust_bundle).wrap_bio(c_in, c_out)
    server = server_context(server_cert, ca.trust_bundle).wrap_bio(s_in, s_out, server_side=True)
    for tls in (client, server):
        assert all(inspect.isbuiltin(getattr(tls, name)) for name in ("read", "write", "pending"))
    for _ in range(10):  # the handshake: a few flights each way
        for tls in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                tls.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    assert verify_peer(client, ca.trust_bundle) == server_cert.identity
    assert verify_peer(server, ca.trust_bundle) == client_cert.identity
    with pytest.raises(ssl.SSLWantReadError):
        server.read(100)
    assert client.write(b"hello, server") == 13
    s_in.write(c_out.read())
    assert server.pending() == 0  # (nothing decrypted before the first read)
    buffer = bytearray(64)
    assert cast(object, server.read(64, buffer)) == 13 and bytes(buffer[:13]) == b"hello, server"
    server.write(b"hello, client")
    c_in.write(s_out.read())
    assert client.read(5) == b"hello" and client.pending() == 8 and client.read(100) == b", client"
