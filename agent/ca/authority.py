"""The signing core of Ambit's CA: a root (created or loaded), or an intermediate below an offline root, that
turns CSRs into workload certificates.

Workload certificates follow Istio's shape: empty subject, a critical subjectAltName holding only the
SPIFFE URI, ECDSA P-256 keys, server and client auth. The CA never trusts what a CSR asks for beyond its
public key: the identity written into the certificate is the one the caller was authorized for.

What signs, from the CA's directory (``--dir``):

* ``root-cert.pem`` + ``root-key.pem``: a self-signed root made by ``--init``; it signs the leaves itself.
* ``ca-cert.pem`` + ``ca-key.pem`` + ``root-cert.pem`` (+ ``cert-chain.pem``): Istio's plug-in CA layout
  (``cacerts``). An intermediate signs; the root that signed it stays offline, and only its certificate is
  here, as the trust bundle. Issued chains are leaf, intermediate(s), root, as istiod sends them. Should the
  cluster's key leak, the intermediate is revoked by replacing it, while the root, and every other cluster's
  trust in it, stays.
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.ca.files import private_directory, write_private, write_public
from agent.identity.keys import key_pem, make_csr, new_key
from hbone import SpiffeId, TrustBundle, WorkloadCertificate

DEFAULT_TTL = dt.timedelta(hours=24)
MAX_TTL = dt.timedelta(days=90)
ROOT_TTL = dt.timedelta(days=3650)
INTERMEDIATE_TTL = dt.timedelta(days=365)
CLOCK_SKEW = dt.timedelta(minutes=1)
ROOT_CERT_FILE = "root-cert.pem"
ROOT_KEY_FILE = "root-key.pem"
CA_CERT_FILE = "ca-cert.pem"  # the plug-in (intermediate) CA, with Istio's file names
CA_KEY_FILE = "ca-key.pem"
CERT_CHAIN_FILE = "cert-chain.pem"  # the intermediate and what is above it, root last


class CsrError(ValueError):
    """A certificate signing request the CA refuses, with the reason."""


class CaMaterialError(ValueError):
    """CA files that cannot be used, naming the file and the problem."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _ca_certificate(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey,
                    signing_key: ec.EllipticCurvePrivateKey, not_after: dt.datetime,
                    path_length: int | None) -> x509.Certificate:
    """A CA certificate: may sign certificates (and CRLs), nothing else."""
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - CLOCK_SKEW).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key()),
                           critical=False)
            .sign(signing_key, hashes.SHA256()))


def _ca_name(trust_domain: str, common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _read_certs(path: Path) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except FileNotFoundError:
        raise CaMaterialError(f"{path} is missing") from None
    except ValueError as e:
        raise CaMaterialError(f"{path}: not PEM certificates: {e}") from None
    return certs


def _read_key(path: Path, cert: x509.Certificate) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise CaMaterialError(f"{path} is missing") from None
    except (ValueError, TypeError) as e:
        raise CaMaterialError(f"{path}: not an unencrypted PEM private key: {e}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CaMaterialError(f"{path}: the CA key must be ECDSA")
    if key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
        raise CaMaterialError(f"{path} is not the key of the certificate next to it")
    return key


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


@dataclass(frozen=True)
class Intermediate:
    """The CA that signs when the root is offline: its certificate and key, and the CA certificates between
    it and the root (nearest first; usually none)."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    chain: tuple[x509.Certificate, ...] = ()


@dataclass
class CertificateAuthority:
    trust_domain: str
    root_cert: x509.Certificate
    root_key: ec.EllipticCurvePrivateKey | None  # None: the root is offline and ``intermediate`` signs
    extra_roots_pem: bytes = b""  # earlier roots still trusted during a rotation
    clock: Callable[[], dt.datetime] = field(default=_now, repr=False)
    intermediate: Intermediate | None = None

    def __post_init__(self) -> None:
        if self.root_key is None and self.intermediate is None:
            raise ValueError("a CA needs the root's key or an intermediate to sign with")

    @classmethod
    def create(cls, trust_domain: str, ttl: dt.timedelta = ROOT_TTL) -> CertificateAuthority:
        key = new_key()
        name = _ca_name(trust_domain, "Ambit root CA")
        cert = _ca_certificate(name, name, key.public_key(), key, _now() + ttl, path_length=None)
        return cls(trust_domain, cert, key)

    def create_intermediate(self, ttl: dt.timedelta = INTERMEDIATE_TTL) -> CertificateAuthority:
        """A CA for a cluster, signed by this root: the root's key stays here (offline), the new CA holds only
        the root's certificate. Its lifetime ends with the root's at the latest."""
        if self.root_key is None or self.intermediate is not None:
            raise CaMaterialError("an intermediate is made with the root's key: use the root's directory")
        key = new_key()
        not_after = min(_now() + ttl, self.root_cert.not_valid_after_utc)
        cert = _ca_certificate(_ca_name(self.trust_domain, "Ambit intermediate CA"), self.root_cert.subject,
                               key.public_key(), self.root_key, not_after, path_length=0)
        return CertificateAuthority(self.trust_domain, self.root_cert, None, self.extra_roots_pem, self.clock,
                                    Intermediate(cert, key))

    @classmethod
    def load(cls, directory: Path, trust_domain: str) -> CertificateAuthority:
        if (directory / CA_CERT_FILE).exists():
            return cls._load_intermediate(directory, trust_domain)
        certs = _read_certs(directory / ROOT_CERT_FILE)
        if not certs:
            raise CaMaterialError(f"{directory / ROOT_CERT_FILE} holds no certificate")
        root, *earlier = certs  # the root whose key is here, then roots still trusted from a rotation
        return cls(trust_domain, root, _read_key(directory / ROOT_KEY_FILE, root), b"".join(map(_pem, earlier)))

    @classmethod
    def _load_intermediate(cls, directory: Path, trust_domain: str) -> CertificateAuthority:
        certs = _read_certs(directory / CA_CERT_FILE)
        if len(certs) != 1:
            raise CaMaterialError(f"{directory / CA_CERT_FILE} must hold exactly one certificate, not {len(certs)}")
        cert = certs[0]
        if not _is_ca(cert):
            raise CaMaterialError(f"{directory / CA_CERT_FILE} is not a CA certificate (basicConstraints ca=false)")
        key = _read_key(directory / CA_KEY_FILE, cert)
        roots = _read_certs(directory / ROOT_CERT_FILE)
        if not roots:
            raise CaMaterialError(f"{directory / ROOT_CERT_FILE} holds no certificate")
        listed = _read_certs(directory / CERT_CHAIN_FILE) if (directory / CERT_CHAIN_FILE).exists() else []
        middle = [c for c in listed if c != cert and c not in roots and c.issuer != c.subject]
        path = [cert, *middle]
        for child, parent in itertools.pairwise(path):
            if not _issued_by(child, parent):
                raise CaMaterialError(f"{directory / CERT_CHAIN_FILE}: {child.subject.rfc4514_string()!r} is not "
                                      f"signed by the next certificate, {parent.subject.rfc4514_string()!r}")
        root = next((r for r in roots if _issued_by(path[-1], r)), None)
        if root is None:
            raise CaMaterialError(f"{directory / CA_CERT_FILE} does not chain to a root in "
                                  f"{directory / ROOT_CERT_FILE} (issuer {path[-1].issuer.rfc4514_string()!r})")
        extra = b"".join(_pem(r) for r in roots if r != root)
        return cls(trust_domain, root, None, extra, intermediate=Intermediate(cert, key, tuple(middle)))

    @classmethod
    def load_or_create(cls, directory: Path, trust_domain: str) -> CertificateAuthority:
        if (directory / ROOT_CERT_FILE).exists() or (directory / CA_CERT_FILE).exists():
            return cls.load(directory, trust_domain)
        ca = cls.create(trust_domain)
        ca.save(directory)
        return ca

    def save(self, directory: Path) -> None:
        """Write the CA into ``directory`` (made 0700; an existing one must be closed to other users)."""
        private_directory(directory)
        if self.intermediate is None:
            assert self.root_key is not None  # (__post_init__)
            write_private(directory / ROOT_KEY_FILE, key_pem(self.root_key))
            write_public(directory / ROOT_CERT_FILE, self.root_pem)
            return
        write_private(directory / CA_KEY_FILE, key_pem(self.intermediate.key))
        write_public(directory / CA_CERT_FILE, _pem(self.intermediate.cert))
        write_public(directory / CERT_CHAIN_FILE, b"".join(self.chain_pem))  # the intermediate(s), root last
        write_public(directory / ROOT_CERT_FILE, self.trust_bundle.roots_pem)

    @property
    def signer(self) -> x509.Certificate:
        """The certificate whose key signs the leaves: the intermediate, else the root."""
        return self.intermediate.cert if self.intermediate is not None else self.root_cert

    def _signing_key(self) -> ec.EllipticCurvePrivateKey:
        if self.intermediate is not None:
            return self.intermediate.key
        assert self.root_key is not None  # (__post_init__)
        return self.root_key

    @property
    def chain_pem(self) -> list[bytes]:
        """What follows a leaf in an issued chain: the intermediates, then the root."""
        above = [self.intermediate.cert, *self.intermediate.chain] if self.intermediate is not None else []
        return [*(_pem(c) for c in above), self.root_pem]

    @property
    def root_pem(self) -> bytes:
        return self.root_cert.public_bytes(serialization.Encoding.PEM)

    @property
    def trust_bundle(self) -> TrustBundle:
        return TrustBundle(self.trust_domain, self.root_pem + self.extra_roots_pem)

    def sign_csr(self, csr_pem: bytes, identity: SpiffeId, ttl: dt.timedelta = DEFAULT_TTL, *,
                 dns_names: Sequence[str] = ()) -> list[bytes]:
        """Sign ``csr_pem`` for ``identity``; returns the chain [leaf, intermediates..., root] in PEM.
        ``dns_names`` are extra SANs the CA decides on (its own serving certificate), never taken from the CSR."""
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
        return [self._issue(pub, identity, min(ttl, MAX_TTL), dns_names), *self.chain_pem]

    def _issue(self, pub: ec.EllipticCurvePublicKey, identity: SpiffeId, ttl: dt.timedelta,
               dns_names: Sequence[str] = ()) -> bytes:
        now = self.clock()
        not_after = min(now + ttl, self.signer.not_valid_after_utc)  # never outliving what signed it
        san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(identity)),
                                           *(x509.DNSName(n) for n in dns_names)])
        key = self._signing_key()
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key())
        cert = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(self.signer.subject)
                .public_key(pub).serial_number(x509.random_serial_number())
                .not_valid_before(now - CLOCK_SKEW).not_valid_after(not_after)
                .add_extension(san, critical=True)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False, False),
                               critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .add_extension(aki, critical=False)
                .sign(key, hashes.SHA256()))
        return _pem(cert)

    def issue(self, identity: SpiffeId, ttl: dt.timedelta = DEFAULT_TTL, *,
              dns_names: Sequence[str] = ()) -> WorkloadCertificate:
        """Key and certificate for ``identity`` made here (the CA's own serving identity, tools, tests)."""
        key = new_key()
        chain = self.sign_csr(make_csr(identity, key), identity, ttl, dns_names=dns_names)
        return WorkloadCertificate.from_pem(b"".join(chain[:-1]), key_pem(key))  # the root is the peer's own

