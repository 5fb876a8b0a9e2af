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
import hashlib
import os
import re
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from hbone.der import CertificateFields, DerError, pem_certificates

if TYPE_CHECKING:
    from cryptography import x509

ALPN = "h2"
ALLOWED_CIPHERS = frozenset({"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384"})

_SEGMENT = r"[A-Za-z0-9._-]+"
_SPIFFE_RE = re.compile(rf"spiffe://({_SEGMENT})/ns/({_SEGMENT})/sa/({_SEGMENT})")


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


def _fields(der: bytes) -> CertificateFields:
    try:
        return CertificateFields.parse(der)
    except DerError as e:
        raise IdentityError(f"malformed certificate: {e}") from None


def _identity(uris: list[str]) -> SpiffeId:
    """The identity of a certificate with these URI SANs: exactly one must be a SPIFFE ID."""
    spiffe = [u for u in uris if u.startswith("spiffe://")]
    if len(spiffe) != 1:
        raise IdentityError(f"certificate must carry exactly one SPIFFE URI SAN, found {len(spiffe)}")
    return SpiffeId.parse(spiffe[0])


def identity_of_der(der: bytes) -> SpiffeId:
    """The single SPIFFE URI SAN of a workload certificate (DER)."""
    return _identity(list(_fields(der).uris))


def identity_of(cert: x509.Certificate) -> SpiffeId:
    """The single SPIFFE URI SAN of a workload certificate (for callers that hold cryptography's object)."""
    from cryptography.hazmat.primitives.serialization import Encoding  # the caller has cryptography loaded

    return identity_of_der(cert.public_bytes(Encoding.DER))


def split_pem(pem: bytes) -> list[tuple[bytes, bytes]]:
    """The certificates of a PEM bundle: (the PEM block, its DER) each; IdentityError if there are none."""
    try:
        certs = pem_certificates(pem)
    except DerError as e:
        raise IdentityError(str(e)) from None
    if not certs:
        raise IdentityError("no certificate in PEM data")
    return certs


@dataclass(frozen=True, slots=True)
class TrustBundle:
    """The roots a mesh trusts, for one trust domain. Several roots coexist while a root rotates."""

    trust_domain: str
    roots_pem: bytes

    def __post_init__(self) -> None:
        for _block, der in split_pem(self.roots_pem):
            root = _fields(der)
            if not root.is_ca:
                raise IdentityError(f"trust bundle entry {root.subject_text!r} is not a CA")

    @property
    def roots(self) -> list[bytes]:
        """The roots, DER each."""
        return [der for _block, der in split_pem(self.roots_pem)]

    def merged(self, other_roots_pem: bytes) -> TrustBundle:
        """This bundle plus other roots (deduplicated), for a root rotation."""
        known = {hashlib.sha256(der).digest() for der in self.roots}
        extra = [block for block, der in split_pem(other_roots_pem) if hashlib.sha256(der).digest() not in known]
        return TrustBundle(self.trust_domain, self.roots_pem + b"".join(extra))


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
        leaf = _fields(split_pem(chain_pem)[0][1])
        identity = identity_of_der(leaf.der)
        check_key_pair(chain_pem, key_pem)
        return cls(identity, chain_pem, key_pem, leaf.not_before, leaf.not_after)

    @property
    def refresh_at(self) -> dt.datetime:
        """Renew at half of the lifetime, as istio-agent and ztunnel do."""
        return self.not_before + (self.not_after - self.not_before) / 2

    def __repr__(self) -> str:  # never print the key
        return f"WorkloadCertificate({self.identity}, not_after={self.not_after.isoformat()})"


class KeyMismatchError(IdentityError):
    """A private key that is not the certificate's."""


def _load_key_pair(ctx: ssl.SSLContext, chain_pem: bytes, key_pem: bytes) -> None:
    # SSLContext only loads keys from paths; an anonymous memory file keeps private keys off every disk. An empty
    # password: an encrypted key fails to load instead of OpenSSL asking a terminal for one.
    fd = os.memfd_create("ambit-cert", os.MFD_CLOEXEC)
    try:
        os.write(fd, chain_pem + b"\n" + key_pem)
        ctx.load_cert_chain(f"/proc/self/fd/{fd}", password=b"")
    finally:
        os.close(fd)


def check_key_pair(chain_pem: bytes, key_pem: bytes) -> None:
    """Raise KeyMismatchError unless ``key_pem`` is the private key of ``chain_pem``'s first certificate (OpenSSL
    checks it as it loads them), IdentityError if they do not load (an encrypted or malformed key)."""
    try:
        _load_key_pair(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), chain_pem, key_pem)
    except ssl.SSLError as e:
        if e.reason == "KEY_VALUES_MISMATCH":
            raise KeyMismatchError("private key does not match the certificate") from None
        raise IdentityError(f"the key pair does not load: {e}") from None


class _DirectSSLObject(ssl.SSLObject):
    """An SSLObject whose ``read``, ``write`` and ``pending`` are the OpenSSL object's own methods, which
    ``ssl.SSLObject``'s wrappers call with the same arguments. uvloop's TLS transport calls them several times per
    record it reads or writes (it keeps the bound methods): without the wrappers, that is no Python frame."""

    @classmethod
    def _create(cls, *args: Any, **kwargs: Any) -> _DirectSSLObject:
        tls = super()._create(*args, **kwargs)  # type: ignore[misc]
        c = tls._sslobj
        tls.read, tls.write, tls.pending = c.read, c.write, c.pending
        return cast(_DirectSSLObject, tls)


def _context(purpose: ssl._SSLMethod, cert: WorkloadCertificate, bundle: TrustBundle) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.sslobject_class = _DirectSSLObject
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = False
    ctx.options |= ssl.OP_NO_TICKET | ssl.OP_NO_COMPRESSION
    ctx.load_verify_locations(cadata=bundle.roots_pem.decode())
    ctx.set_alpn_protocols([ALPN])
    _load_key_pair(ctx, cert.chain_pem, cert.key_pem)
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
    # The verified peer certificate as OpenSSL decoded it (8 us; reading its DER in Python took 30): {} unverified
    cert = tls.getpeercert()
    if not cert:
        raise IdentityError("peer presented no certificate")
    sans = cert.get("subjectAltName", ())
    peer = _identity([e[1] for e in sans if isinstance(e, tuple) and e[0] == "URI" and isinstance(e[1], str)])
    if peer.trust_domain != bundle.trust_domain:
        raise IdentityError(f"peer identity {peer} is outside trust domain {bundle.trust_domain!r}")
    if expected is not None and peer != expected:
        raise IdentityError(f"peer identity {peer} is not the expected {expected}")
    return peer
