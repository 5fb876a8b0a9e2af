"""What the mesh reads from an X.509 certificate, read from its DER without a crypto library: the subject and issuer,
the validity, whether it is a CA (basicConstraints) and its URI SANs; and PEM certificate blocks split.

The node agent never verifies a signature itself (OpenSSL does, in every handshake; a worker process does when a
certificate is issued, ``agent.identity.x509ops``), so it only needs these fields: reading them here keeps the
cryptography package (7.4 MiB of the idle agent's memory) out of the long-lived process. Anything malformed raises
``DerError`` naming what.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import re
from dataclasses import dataclass

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n(.*?)-----END CERTIFICATE-----\r?\n?", re.DOTALL)

SEQUENCE, SET, BOOLEAN, OID, OCTET_STRING = 0x30, 0x31, 0x01, 0x06, 0x04
UTC_TIME, GENERALIZED_TIME = 0x17, 0x18
VERSION, EXTENSIONS = 0xA0, 0xA3  # [0] and [3], constructed
URI_NAME = 0x86  # GeneralName uniformResourceIdentifier [6], primitive
BASIC_CONSTRAINTS = bytes.fromhex("551d13")  # 2.5.29.19
SUBJECT_ALT_NAME = bytes.fromhex("551d11")  # 2.5.29.17
_ATTRIBUTES = {bytes.fromhex("550403"): "CN", bytes.fromhex("55040a"): "O", bytes.fromhex("55040b"): "OU",
               bytes.fromhex("550406"): "C", bytes.fromhex("550407"): "L", bytes.fromhex("550408"): "ST"}


class DerError(ValueError):
    """Data that is not the DER (or PEM) certificate it should be."""


Element = tuple[int, int, int, int]  # tag, start of its content, end, start of the element (its tag)


def _read(data: bytes, pos: int, end: int) -> Element:
    """The element at ``pos`` (before ``end``)."""
    begin = pos
    if pos + 2 > end:
        raise DerError(f"truncated element at byte {pos}")
    tag, first = data[pos], data[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        n = first & 0x7F
        if n == 0 or n > 4 or pos + n > end:
            raise DerError(f"bad length at byte {pos - 1}")
        length = int.from_bytes(data[pos:pos + n], "big")
        pos += n
    if pos + length > end:
        raise DerError(f"element at byte {pos} runs past its container")
    return tag, pos, pos + length, begin


def _children(data: bytes, start: int, end: int) -> list[Element]:
    out = []
    while start < end:
        element = _read(data, start, end)
        out.append(element)
        start = element[2]
    return out


def _expect(element: Element, tag: int, what: str) -> tuple[int, int]:
    if element[0] != tag:
        raise DerError(f"{what}: tag 0x{element[0]:02x}, not 0x{tag:02x}")
    return element[1], element[2]


def _time(data: bytes, element: Element) -> dt.datetime:
    """A UTCTime (YYMMDDHHMMSSZ) or GeneralizedTime (YYYYMMDDHHMMSSZ) in UTC, as DER writes them. Read digit by
    digit: ``datetime.strptime`` would bring _strptime, calendar and locale into the agent."""
    tag, s, e, _ = element
    text = data[s:e].decode("ascii", errors="replace")
    digits = text[:-1]
    if (text[-1:] != "Z" or len(digits) != {UTC_TIME: 12, GENERALIZED_TIME: 14}.get(tag)
            or not (digits.isascii() and digits.isdigit())):
        raise DerError(f"validity time {text!r} is not UTCTime or GeneralizedTime in UTC")
    if tag == UTC_TIME:
        year = int(digits[:2])
        digits = f"{1900 + year if year >= 50 else 2000 + year}{digits[2:]}"
    try:
        return dt.datetime(int(digits[:4]), int(digits[4:6]), int(digits[6:8]), int(digits[8:10]),
                           int(digits[10:12]), int(digits[12:]), tzinfo=dt.UTC)
    except ValueError:
        raise DerError(f"validity time {text!r} is not a date and time") from None


def name_text(data: bytes) -> str:
    """A DER Name as RFC 4514 writes it (last RDN first), e.g. ``O=cluster.local``; unknown attributes by OID."""
    parts = []
    for rdn in _children(data, *_expect(_read(data, 0, len(data)), SEQUENCE, "Name")):
        atvs = []
        for atv in _children(data, *_expect(rdn, SET, "RelativeDistinguishedName")):
            oid, value = _children(data, *_expect(atv, SEQUENCE, "AttributeTypeAndValue"))[:2]
            key = data[oid[1]:oid[2]]
            atvs.append(f"{_ATTRIBUTES.get(key, key.hex())}={data[value[1]:value[2]].decode(errors='replace')}")
        parts.append("+".join(atvs))
    return ",".join(reversed(parts))


@dataclass(frozen=True, slots=True)
class CertificateFields:
    """The fields of one certificate the mesh reads."""

    der: bytes
    issuer: bytes  # DER of the Name
    subject: bytes
    not_before: dt.datetime
    not_after: dt.datetime
    is_ca: bool
    uris: tuple[str, ...]  # URI SANs

    @classmethod
    def parse(cls, der: bytes) -> CertificateFields:
        cert = _children(der, *_expect(_read(der, 0, len(der)), SEQUENCE, "Certificate"))
        if len(cert) != 3:
            raise DerError("Certificate: not tbsCertificate, signatureAlgorithm, signature")
        tbs = _children(der, *_expect(cert[0], SEQUENCE, "tbsCertificate"))
        if tbs and tbs[0][0] == VERSION:
            tbs = tbs[1:]
        if len(tbs) < 6:
            raise DerError("tbsCertificate: fields missing")
        _serial, _alg, issuer, validity, subject, _spki, *rest = tbs
        times = _children(der, *_expect(validity, SEQUENCE, "Validity"))
        if len(times) != 2:
            raise DerError("Validity: not notBefore, notAfter")
        is_ca, uris = False, []
        for ext_list in (e for e in rest if e[0] == EXTENSIONS):
            for ext in _children(der, *_expect(_read(der, ext_list[1], ext_list[2]), SEQUENCE, "Extensions")):
                fields = _children(der, *_expect(ext, SEQUENCE, "Extension"))
                oid = der[slice(*_expect(fields[0], OID, "extnID"))]
                vs, ve = _expect(fields[-1], OCTET_STRING, "extnValue")
                if oid == BASIC_CONSTRAINTS:
                    bc = _children(der, *_expect(_read(der, vs, ve), SEQUENCE, "BasicConstraints"))
                    is_ca = bool(bc) and bc[0][0] == BOOLEAN and der[bc[0][1]:bc[0][2]] != b"\x00"
                elif oid == SUBJECT_ALT_NAME:
                    names = _children(der, *_expect(_read(der, vs, ve), SEQUENCE, "SubjectAltName"))
                    uris += [der[s:e].decode("ascii", errors="replace") for tag, s, e, _ in names if tag == URI_NAME]
        return cls(der, der[issuer[3]:issuer[2]], der[subject[3]:subject[2]], _time(der, times[0]),
                   _time(der, times[1]), is_ca, tuple(uris))

    @property
    def subject_text(self) -> str:
        return name_text(self.subject)

    @property
    def issuer_text(self) -> str:
        return name_text(self.issuer)


def pem_certificates(pem: bytes) -> list[tuple[bytes, bytes]]:
    """Each ``CERTIFICATE`` block of ``pem``: (the block as written, its DER)."""
    out: list[tuple[bytes, bytes]] = []
    for m in _PEM_CERT.finditer(pem):
        try:
            der = base64.b64decode(b"".join(m.group(1).split()), validate=True)
        except binascii.Error as e:
            raise DerError(f"PEM certificate block {len(out) + 1}: bad base64 ({e})") from None
        block = m.group(0)
        out.append((block if block.endswith(b"\n") else block + b"\n", der))
    return out
