"""The signing core of Ambit's CA: a root (created or loaded) that turns CSRs into workload certificates.

Workload certificates follow Istio's shape: empty subject, a critical subjectAltName holding only the
SPIFFE URI, ECDSA P-256 keys, server and client auth. The CA never trusts what a CSR asks for beyond its
public key: the identity written into the certificate is the one the caller was authorized for.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.identity.keys import key_pem, make_csr, new_key
from hbone.identity import SpiffeId, TrustBundle, WorkloadCertificate

DEFAULT_TTL = dt.timedelta(hours=24)
MAX_TTL = dt.timedelta(days=90)
ROOT_TTL = dt.timedelta(days=3650)
CLOCK_SKEW = dt.timedelta(minutes=1)
ROOT_CERT_FILE = "root-cert.pem"
ROOT_KEY_FILE = "root-key.pem"


class CsrError(ValueError):
    """A certificate signing request the CA refuses, with the reason."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass
class CertificateAuthority:
    trust_domain: str
    root_cert: x509.Certificate
    root_key: ec.EllipticCurvePrivateKey
    extra_roots_pem: bytes = b""  # earlier roots still trusted during a rotation
    clock: Callable[[], dt.datetime] = field(default=_now, repr=False)

    @classmethod
    def create(cls, trust_domain: str, ttl: dt.timedelta = ROOT_TTL) -> CertificateAuthority:
        key = new_key()
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
                          x509.NameAttribute(NameOID.COMMON_NAME, "Ambit root CA")])
        now = _now()
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - CLOCK_SKEW).not_valid_after(now + ttl)
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                               critical=True)
                .add_extension(ski, critical=False)
                .sign(key, hashes.SHA256()))
        return cls(trust_domain, cert, key)

    @classmethod
    def load(cls, directory: Path, trust_domain: str) -> CertificateAuthority:
        cert = x509.load_pem_x509_certificate((directory / ROOT_CERT_FILE).read_bytes())
        key = serialization.load_pem_private_key((directory / ROOT_KEY_FILE).read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CsrError(f"{directory / ROOT_KEY_FILE}: the CA key must be ECDSA")
        return cls(trust_domain, cert, key)

    @classmethod
    def load_or_create(cls, directory: Path, trust_domain: str) -> CertificateAuthority:
        if (directory / ROOT_CERT_FILE).exists():
            return cls.load(directory, trust_domain)
        ca = cls.create(trust_domain)
        ca.save(directory)
        return ca

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        key_path = directory / ROOT_KEY_FILE
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem(self.root_key))
        (directory / ROOT_CERT_FILE).write_bytes(self.root_pem)

    @property
    def root_pem(self) -> bytes:
        return self.root_cert.public_bytes(serialization.Encoding.PEM)

    @property
    def trust_bundle(self) -> TrustBundle:
        return TrustBundle(self.trust_domain, self.root_pem + self.extra_roots_pem)

    def sign_csr(self, csr_pem: bytes, identity: SpiffeId, ttl: dt.timedelta = DEFAULT_TTL, *,
                 dns_names: Sequence[str] = ()) -> list[bytes]:
        """Sign ``csr_pem`` for ``identity``; returns the chain [leaf, root] in PEM. ``dns_names`` are extra
        SANs the CA decides on (its own serving certificate), never taken from the CSR."""
        if identity.trust_domain != self.trust_domain:
            raise CsrError(f"identity {identity} is outside trust domain {self.trust_domain!r}")
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as e:
            raise CsrError(f"CSR is not a PEM certificate request: {e}") from None
        if not csr.is_signature_valid:
            raise CsrError("CSR signature does not verify")
        pub = csr.public_key()
        if not isinstance(pub, ec.EllipticCurvePublicKey) or pub.curve.name != "secp256r1":
            raise CsrError("CSR key must be ECDSA P-256")
        try:
            san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            asked = set(san.get_values_for_type(x509.UniformResourceIdentifier))
        except x509.ExtensionNotFound:
            asked = set()
        if asked and asked != {str(identity)}:
            raise CsrError(f"CSR asks for {sorted(asked)}, caller is authorized for {identity}")
        if ttl <= dt.timedelta(0):
            raise CsrError(f"validity must be positive, got {ttl.total_seconds():.0f}s")
        return [self._issue(pub, identity, min(ttl, MAX_TTL), dns_names), self.root_pem]

    def _issue(self, pub: ec.EllipticCurvePublicKey, identity: SpiffeId, ttl: dt.timedelta,
               dns_names: Sequence[str] = ()) -> bytes:
        now = self.clock()
        san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(identity)),
                                           *(x509.DNSName(n) for n in dns_names)])
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(self.root_key.public_key())
        cert = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(self.root_cert.subject)
                .public_key(pub).serial_number(x509.random_serial_number())
                .not_valid_before(now - CLOCK_SKEW).not_valid_after(now + ttl)
                .add_extension(san, critical=True)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False, False),
                               critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .add_extension(aki, critical=False)
                .sign(self.root_key, hashes.SHA256()))
        return cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, identity: SpiffeId, ttl: dt.timedelta = DEFAULT_TTL, *,
              dns_names: Sequence[str] = ()) -> WorkloadCertificate:
        """Key and certificate for ``identity`` made here (the CA's own serving identity, tools, tests)."""
        key = new_key()
        chain = self.sign_csr(make_csr(identity, key), identity, ttl, dns_names=dns_names)
        return WorkloadCertificate.from_pem(chain[0], key_pem(key))

