"""The client's TLS context for the API server: its CA bundle, or none (``insecure-skip-tls-verify``), and a
client certificate when the user has one. PEM material is taken from memory: the key pair is handed to OpenSSL
through anonymous memory files (``memfd``), so that no private key is ever written to disk."""

from __future__ import annotations

import os
import ssl


class TlsMaterialError(Exception):
    """A CA bundle or key pair OpenSSL cannot load; ``client`` tells which (the user's key pair or the cluster's CA).
    The message says why, not where from: the caller names the field."""

    def __init__(self, message: str, *, client: bool) -> None:
        super().__init__(message)
        self.client = client


def client_context(ca_pem: bytes | None, insecure: bool, cert_pem: bytes | None = None,
                   key_pem: bytes | None = None) -> ssl.SSLContext:
    """Verifying the server against ``ca_pem`` (the system's roots when None), or not at all when ``insecure``."""
    context = ssl.create_default_context()
    # Go's verifier (the API server's clients) does not apply OpenSSL's strict X.509 checks; newer Pythons turn
    # them on by default, and cluster CAs made by some tools would then fail.
    context.verify_flags &= ~getattr(ssl, "VERIFY_X509_STRICT", 0)
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif ca_pem is not None:
        try:
            context.load_verify_locations(cadata=ca_pem.decode("ascii"))
        except (ssl.SSLError, UnicodeDecodeError, ValueError) as e:
            raise TlsMaterialError(f"not a PEM certificate bundle ({_reason(e)})", client=False) from None
    if cert_pem is not None and key_pem is not None:
        _load_key_pair(context, cert_pem, key_pem)
    return context


def _load_key_pair(context: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    fds: list[int] = []
    try:
        for data in (cert_pem, key_pem):
            fd = os.memfd_create("kube-client-credential", os.MFD_CLOEXEC)
            fds.append(fd)
            with os.fdopen(os.dup(fd), "wb") as f:
                f.write(data)
        context.load_cert_chain(f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}", password=_no_password)
    except (ssl.SSLError, _EncryptedKey, OSError) as e:
        raise TlsMaterialError(f"not a PEM certificate and its key ({_reason(e)})", client=True) from None
    finally:
        for fd in fds:
            os.close(fd)


class _EncryptedKey(Exception):
    def __str__(self) -> str:
        return "the key is encrypted; kubeconfig keys cannot be"


def _no_password() -> bytes:
    raise _EncryptedKey  # OpenSSL asks only for an encrypted key; never prompt on a terminal


def _reason(error: BaseException) -> str:
    if isinstance(error, ssl.SSLError) and error.reason:
        return str(error.reason)
    return str(error) or type(error).__name__
