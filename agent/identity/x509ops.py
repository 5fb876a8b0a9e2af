"""The x509 work that needs a crypto library, done in a short-lived worker process (``python -m
agent.identity.x509ops``, driven by ``agent.identity.worker``): making a workload's key and CSR, and checking that a
chain the CA returned is signed up to a root of the trust bundle.

The node agent needs these only when a certificate is issued or a root rotates; in the agent itself the cryptography
package cost 7.4 MiB of an idle agent's PSS for the rest of its life (issue 11). The worker reads one JSON request
per line on stdin and answers one JSON line on stdout:

    {"op": "csr", "identity": "spiffe://..."}                 -> {"key": PEM, "csr": PEM}
    {"op": "verify", "chain": PEM, "roots": PEM}              -> {"ok": true}
    any failure                                               -> {"error": "what went wrong"}

It ends at the end of its input.
"""

from __future__ import annotations

import itertools
import json
import sys
from typing import Any, TextIO

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from agent.identity.keys import key_pem, make_csr, new_key
from hbone.identity import IdentityError, SpiffeId


def verify_chain(chain: list[x509.Certificate], roots_pem: bytes) -> None:
    """Check that ``chain`` (leaf, then intermediates; a trailing root may be included) is signed up to one of the
    roots in ``roots_pem`` (a trust bundle's). Raises IdentityError."""
    roots = x509.load_pem_x509_certificates(roots_pem)
    path = [c for c in chain if c.issuer != c.subject or c is chain[0]]  # drop self-signed roots sent along
    for child, parent in itertools.pairwise(path):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature) as e:
            raise IdentityError(f"certificate chain is broken at {child.issuer.rfc4514_string()!r}: "
                                f"{e or type(e).__name__}") from None
    for root in roots:
        try:
            path[-1].verify_directly_issued_by(root)
            return
        except (ValueError, TypeError, InvalidSignature):
            continue
    raise IdentityError(f"certificate issued by {path[-1].issuer.rfc4514_string()!r} does not chain to any "
                        f"of the {len(roots)} root(s) in the trust bundle (is a new root missing from it?)")


def answer(request: dict[str, Any]) -> dict[str, Any]:
    """The reply to one request."""
    try:
        if request.get("op") == "csr":
            key = new_key()
            return {"key": key_pem(key).decode(), "csr": make_csr(SpiffeId.parse(request["identity"]), key).decode()}
        if request.get("op") == "verify":
            chain = x509.load_pem_x509_certificates(request["chain"].encode())
            verify_chain(chain, request["roots"].encode())
            return {"ok": True}
        return {"error": f"unknown request {request.get('op')!r}"}
    except (IdentityError, ValueError, KeyError, TypeError) as e:
        return {"error": str(e) or type(e).__name__}


def serve(requests: TextIO, replies: TextIO) -> None:
    for line in requests:
        try:
            request = json.loads(line)
        except ValueError as e:
            reply: dict[str, Any] = {"error": f"not a JSON request: {e}"}
        else:
            reply = answer(request) if isinstance(request, dict) else {"error": "a request is a JSON object"}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


if __name__ == "__main__":
    serve(sys.stdin, sys.stdout)
