"""hbone.der reads what cryptography reads from the same certificates (names, validity, CA flag, URI SANs), splits PEM
as it does, and refuses malformed DER with DerError only, never another exception."""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import random

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from hbone.der import CertificateFields, DerError, pem_certificates

KEY = ec.generate_private_key(ec.SECP256R1())


def _cert(*, name: x509.Name | None = None, issuer: x509.Name | None = None, ca: bool | None = None,
          sans: list[x509.GeneralName] | None = None, start: dt.datetime | None = None,
          days: int = 1) -> x509.Certificate:
    name = name or x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cluster.local")])
    start = start or dt.datetime(2026, 12, 6, 1, 2, 3, tzinfo=dt.UTC)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name).public_key(KEY.public_key())
               .serial_number(random.getrandbits(64)).not_valid_before(start)
               .not_valid_after(start + dt.timedelta(days=days)))
    if ca is not None:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(KEY, hashes.SHA256())


CASES = {
    "root CA": _cert(ca=True),
    "leaf, one SPIFFE URI": _cert(ca=False, sans=[x509.UniformResourceIdentifier("spiffe://td/ns/a/sa/b")]),
    "leaf without basicConstraints": _cert(sans=[x509.UniformResourceIdentifier("spiffe://td/ns/a/sa/b")]),
    "mixed SANs": _cert(sans=[x509.DNSName("web.shop.svc"), x509.UniformResourceIdentifier("spiffe://td/ns/a/sa/b"),
                              x509.UniformResourceIdentifier("https://example.test/x"),
                              x509.IPAddress(ipaddress.ip_address("10.0.0.1"))]),
    "no extensions": _cert(),
    "GeneralizedTime after 2049": _cert(start=dt.datetime(2049, 12, 31, 23, 0, tzinfo=dt.UTC), days=400),
    "many name attributes": _cert(name=x509.Name([
        x509.NameAttribute(NameOID.COUNTRY_NAME, "DE"), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Ambit, Inc"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "mesh"), x509.NameAttribute(NameOID.COMMON_NAME, "root"),
        x509.NameAttribute(NameOID.EMAIL_ADDRESS, "ops@example.test")]), ca=True),
    "issued by another name": _cert(issuer=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Ambit root CA")]),
                                     ca=False),
}


@pytest.mark.parametrize("case", CASES)
def test_the_fields_are_cryptographys(case: str) -> None:
    cert = CASES[case]
    der = cert.public_bytes(Encoding.DER)
    fields = CertificateFields.parse(der)
    assert fields.der == der
    assert fields.subject == cert.subject.public_bytes() and fields.issuer == cert.issuer.public_bytes()
    assert fields.not_before == cert.not_valid_before_utc and fields.not_after == cert.not_valid_after_utc
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    assert fields.is_ca == is_ca
    try:
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    assert list(fields.uris) == uris
    if "@" not in cert.subject.rfc4514_string():  # an e-mail attribute is shown by OID here, by name there
        assert fields.subject_text == cert.subject.rfc4514_string().replace("\\,", ",")


def test_pem_bundles_split_as_cryptography_splits_them() -> None:
    pems = [c.public_bytes(Encoding.PEM) for c in CASES.values()]
    bundle = b"comment before\n" + pems[0] + b"\n" + pems[1].replace(b"\n", b"\r\n") + b"text between\n" + pems[2]
    found = pem_certificates(bundle)
    assert [der for _block, der in found] == [c.public_bytes(Encoding.DER) for c in
                                              x509.load_pem_x509_certificates(bundle)]
    assert [x509.load_pem_x509_certificate(block) for block, _der in found] == list(CASES.values())[:3]
    assert pem_certificates(b"no certificate here\n") == []
    with pytest.raises(DerError, match="bad base64"):
        pem_certificates(b"-----BEGIN CERTIFICATE-----\n@@@@\n-----END CERTIFICATE-----\n")


def test_malformed_der_raises_der_error_and_nothing_else() -> None:
    der = CASES["mixed SANs"].public_bytes(Encoding.DER)
    rnd = random.Random(11)
    for cut in range(len(der)):  # every truncation
        with pytest.raises(DerError):
            CertificateFields.parse(der[:cut])
    for _ in range(3000):  # random byte changes: parsed or DerError, nothing else
        broken = bytearray(der)
        for _ in range(rnd.randint(1, 4)):
            broken[rnd.randrange(len(broken))] = rnd.randrange(256)
        with contextlib.suppress(DerError):
            CertificateFields.parse(bytes(broken))
    with pytest.raises(DerError, match="Certificate: tag 0x02"):
        CertificateFields.parse(b"\x02\x01\x00")
    with pytest.raises(DerError, match="bad length"):
        CertificateFields.parse(b"\x30\x85\x00\x00\x00\x00\x01")


@pytest.mark.parametrize(("written", "read"), [
    (b"500101000000Z", dt.datetime(1950, 1, 1, tzinfo=dt.UTC)),  # UTCTime's two-digit years: 50-99 are 19xx
    (b"491231235959Z", dt.datetime(2049, 12, 31, 23, 59, 59, tzinfo=dt.UTC)),  # 00-49 are 20xx
    (b"240229120000Z", dt.datetime(2024, 2, 29, 12, tzinfo=dt.UTC)),
])
def test_validity_times_are_read_digit_by_digit(written: bytes, read: dt.datetime) -> None:
    der = CASES["no extensions"].public_bytes(Encoding.DER)
    assert der.count(b"261206010203Z") == 1  # the notBefore of _cert's default start, a UTCTime
    assert CertificateFields.parse(der.replace(b"261206010203Z", written)).not_before == read


@pytest.mark.parametrize("written", [b"261306010203Z", b"260230010203Z", b"261206240203Z", b"261206010260Z",
                                     b"2612060102+3Z", b"26120601020_Z", b"2612060102 3Z", b"261206010203z",
                                     b"261206010203+", b"2612060102\xd9\xa3Z"])  # the last: an Arabic-Indic 3
def test_a_validity_time_that_is_not_one_is_a_der_error(written: bytes) -> None:
    der = CASES["no extensions"].public_bytes(Encoding.DER)
    with pytest.raises(DerError, match="validity time"):
        CertificateFields.parse(der.replace(b"261206010203Z", written))
