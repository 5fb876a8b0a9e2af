"""Workload identity for HBONE: SPIFFE IDs, workload certificates, trust bundles and mutual-TLS contexts.

Every HBONE connection is TLS 1.3 with ALPN ``h2``, no SNI and no session resumption; both sides present
a certificate whose only URI SAN is ``spiffe://<trust-domain>/ns/<ns>/sa/<sa>``. OpenSSL verifies the
chain against the trust bundle (which may hold several roots while a root rotates); what OpenSSL cannot
know, the peer's SPIFFE identity and trust domain and the AES-GCM cipher, ``verify_peer`` checks after
the handshake.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import re
import ssl
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

ALPN = "h2"
ALLOWED_CIPHERS = frozenset({"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384"})

_SEGMENT = r"[A-Za-z0-9._-]+"
_SPIFFE_RE = re.compile(rf"spiffe://({_SEGMENT})/ns/({_SEGMENT})/sa/({_SEGMENT})")


_SHA256 = hashes.SHA256()


class IdentityError(Exception):
    """A certificate, SPIFFE ID or TLS peer that does not satisfy the mesh's identity rules."""


@dataclass(frozen=True, slots=True, order=True)
class SpiffeId:
    trust_domain: str
    namespace: str
    service_account: str

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        m = _SPIFFE_RE.fullmatch(uri)
        if m is None:
            raise IdentityError(f"not a workload SPIFFE ID (spiffe://<td>/ns/<ns>/sa/<sa>): {uri!r}")
        return cls(m.group(1), m.group(2), m.group(3))

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"


def identity_of(cert: x509.Certificate) -> SpiffeId:
    """The single SPIFFE URI SAN of a workload certificate."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise IdentityError("certificate has no subjectAltName") from None
    uris = [u for u in san.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith("spiffe://")]
    if len(uris) != 1:
        raise IdentityError(f"certificate must carry exactly one SPIFFE URI SAN, found {len(uris)}")
    return SpiffeId.parse(uris[0])


def _split_pem(pem: bytes) -> list[x509.Certificate]:
    certs = x509.load_pem_x509_certificates(pem)
    if not certs:
        raise IdentityError("no certificate in PEM data")
    return certs


@dataclass(frozen=True, slots=True)
class TrustBundle:
    """The roots a mesh trusts, for one trust domain. Several roots coexist while a root rotates."""

    trust_domain: str
    roots_pem: bytes

    def __post_init__(self) -> None:
        for root in _split_pem(self.roots_pem):
            bc = root.extensions.get_extension_for_class(x509.BasicConstraints).value
            if not bc.ca:
                raise IdentityError(f"trust bundle entry {root.subject.rfc4514_string()!r} is not a CA")

    @property
    def roots(self) -> list[x509.Certificate]:
        return _split_pem(self.roots_pem)

    def merged(self, other_roots_pem: bytes) -> TrustBundle:
        """This bundle plus other roots (deduplicated), for a root rotation."""
        known = {c.fingerprint(_SHA256) for c in self.roots}
        extra = [c for c in _split_pem(other_roots_pem) if c.fingerprint(_SHA256) not in known]
        pem = self.roots_pem + b"".join(c.public_bytes(serialization.Encoding.PEM) for c in extra)
        return TrustBundle(self.trust_domain, pem)


@dataclass(frozen=True, slots=True)
class WorkloadCertificate:
    """A workload's key and certificate chain (leaf first, then intermediates, root excluded)."""

    identity: SpiffeId
    chain_pem: bytes
    key_pem: bytes
    not_before: dt.datetime
    not_after: dt.datetime

    @classmethod
    def from_pem(cls, chain_pem: bytes, key_pem: bytes) -> WorkloadCertificate:
        leaf = _split_pem(chain_pem)[0]
        key = serialization.load_pem_private_key(key_pem, password=None)
        if key.public_key().public_numbers() != leaf.public_key().public_numbers():  # type: ignore[union-attr]
            raise IdentityError("private key does not match the certificate")
        return cls(identity_of(leaf), chain_pem, key_pem, leaf.not_valid_before_utc, leaf.not_valid_after_utc)

    @property
    def refresh_at(self) -> dt.datetime:
        """Renew at half of the lifetime, as istio-agent and ztunnel do."""
        return self.not_before + (self.not_after - self.not_before) / 2

    def __repr__(self) -> str:  # never print the key
        return f"WorkloadCertificate({self.identity}, not_after={self.not_after.isoformat()})"


def _load_key_pair(ctx: ssl.SSLContext, cert: WorkloadCertificate) -> None:
    # SSLContext only loads keys from paths; an anonymous memory file keeps private keys off every disk.
    fd = os.memfd_create("ambit-cert", os.MFD_CLOEXEC)
    try:
        os.write(fd, cert.chain_pem + b"\n" + cert.key_pem)
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def _context(purpose: ssl._SSLMethod, cert: WorkloadCertificate, bundle: TrustBundle) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = False
    ctx.options |= ssl.OP_NO_TICKET | ssl.OP_NO_COMPRESSION
    ctx.load_verify_locations(cadata=bundle.roots_pem.decode())
    ctx.set_alpn_protocols([ALPN])
    _load_key_pair(ctx, cert)
    return ctx


@functools.lru_cache(maxsize=4096)
def server_context(cert: WorkloadCertificate, bundle: TrustBundle) -> ssl.SSLContext:
    """TLS server context presenting ``cert`` and requiring a client certificate chained to ``bundle``."""
    ctx = _context(ssl.PROTOCOL_TLS_SERVER, cert, bundle)
    ctx.num_tickets = 0  # no session resumption
    return ctx


@functools.lru_cache(maxsize=4096)
def client_context(cert: WorkloadCertificate, bundle: TrustBundle) -> ssl.SSLContext:
    """TLS client context presenting the SOURCE workload's ``cert``; the peer is checked by verify_peer."""
    return _context(ssl.PROTOCOL_TLS_CLIENT, cert, bundle)


def verify_peer(tls: ssl.SSLObject | ssl.SSLSocket, bundle: TrustBundle, expected: SpiffeId | None = None) -> SpiffeId:
    """Check a completed handshake: TLS 1.3, AES-GCM, ALPN h2, and a peer SPIFFE ID in our trust domain
    (equal to ``expected`` when given). Returns the peer's identity."""
    if tls.version() != "TLSv1.3":
        raise IdentityError(f"peer negotiated {tls.version()}, HBONE requires TLSv1.3")
    cipher = tls.cipher()
    if cipher is None or cipher[0] not in ALLOWED_CIPHERS:
        raise IdentityError(f"peer negotiated cipher {cipher and cipher[0]}, HBONE requires AES-GCM")
    if tls.selected_alpn_protocol() != ALPN:
        raise IdentityError(f"peer negotiated ALPN {tls.selected_alpn_protocol()!r}, HBONE requires 'h2'")
    der = tls.getpeercert(binary_form=True)
    if not der:
        raise IdentityError("peer presented no certificate")
    peer = identity_of(x509.load_der_x509_certificate(der))
    if peer.trust_domain != bundle.trust_domain:
        raise IdentityError(f"peer identity {peer} is outside trust domain {bundle.trust_domain!r}")
    if expected is not None and peer != expected:
        raise IdentityError(f"peer identity {peer} is not the expected {expected}")
    return peer
