"""Certificates for Ambit's own parts, made offline from the CA's directory: ``ambit ca --issue KIND --out DIR``.

    intermediate  a CA for one cluster, signed by the root in --dir (which must hold the root's key), in
                  Istio's plug-in layout: ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem. Deploy that
                  directory as the cluster's CA; the root key never goes to the cluster.
    observer      the agents' Observer server certificate: DNS observer.ambit.internal (what clients check)
                  and spiffe://<td>/ns/ambit-system/sa/ambit-agent
    operator      a client of the Observers (``ambit observe`` from a workstation, a relay):
                  spiffe://<td>/ns/ambit-system/sa/ambit-operator, the only identity they serve over TCP

observer and operator are written as DIR/tls.crt (the leaf, then intermediates), DIR/tls.key (0600) and
DIR/ca.crt (the trust bundle), the keys of a Kubernetes TLS Secret. These identities are of the
``ambit-system`` namespace, which the CA's API never issues (agent/ca/auth.py): only whoever holds the CA's
key, here, can make them. DIR is made 0700 (an existing one must be closed to other users).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Literal

from agent.ca.authority import INTERMEDIATE_TTL, MAX_TTL, CertificateAuthority
from agent.ca.files import private_directory, write_private, write_public
from agent.telemetry.observer_tls import OBSERVER_SERVER_NAME, observer_identity, operator_identity

Kind = Literal["intermediate", "observer", "operator"]
KINDS: tuple[Kind, ...] = ("intermediate", "observer", "operator")
CERT_FILE, KEY_FILE, CA_FILE = "tls.crt", "tls.key", "ca.crt"


def default_ttl(kind: Kind) -> dt.timedelta:
    return INTERMEDIATE_TTL if kind == "intermediate" else MAX_TTL


def issue(authority: CertificateAuthority, kind: Kind, out: Path, ttl: dt.timedelta | None = None) -> str:
    """Write ``kind``'s key and certificate into ``out``; returns a line saying what was made."""
    ttl = ttl or default_ttl(kind)
    if kind == "intermediate":
        child = authority.create_intermediate(ttl)
        child.save(out)
        assert child.intermediate is not None
        return (f"an intermediate CA in {out}, valid until {child.intermediate.cert.not_valid_after_utc.date()}; "
                f"its root's key stays where it is")
    td = authority.trust_domain
    if kind == "observer":
        identity, dns = observer_identity(td), [OBSERVER_SERVER_NAME]
    else:
        identity, dns = operator_identity(td), []
    cert = authority.issue(identity, ttl, dns_names=dns)
    private_directory(out)
    write_private(out / KEY_FILE, cert.key_pem)
    write_public(out / CERT_FILE, cert.chain_pem)
    write_public(out / CA_FILE, authority.trust_bundle.roots_pem)
    names = " ".join([str(identity), *dns])
    return f"{kind} certificate for {names} in {out}, valid until {cert.not_after.date()}"
