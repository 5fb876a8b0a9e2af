"""Workload keys and the CSRs that ask the CA for a certificate (ECDSA P-256, as ztunnel's)."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hbone.identity import SpiffeId


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_csr(identity: SpiffeId, key: ec.EllipticCurvePrivateKey) -> bytes:
    """A CSR carrying ``identity`` as its URI SAN, as ztunnel sends to istiod."""
    san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(identity))])
    csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
           .add_extension(san, critical=True).sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM)
