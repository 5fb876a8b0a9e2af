"""Who may read an agent's flows from elsewhere: the Observer's mutual TLS.

The flows of a node are the mesh's graph (who talks to whom, which policy denied what), so the Observer
serves them as Hubble's TLS-enabled server does: local clients on a unix socket, whose file permissions
decide; remote ones (``ambit observe`` from an operator, a relay) only over mutual TLS on TCP. There is no
plaintext TCP listener at all, not even as an option: every local use has the socket.

Certificates, both from Ambit's CA (``ambit ca --issue observer|operator``, written in a Kubernetes TLS
Secret's shape: tls.crt, tls.key, ca.crt):

* the agents present one server certificate with the DNS name ``observer.ambit.internal``, checked by the
  client whatever address it dialled (a port-forward, a pod IP); the name is not meant to resolve;
* a client must present a certificate that chains to the client CA bundle (the mesh's trust bundle) AND
  carries the operator's SPIFFE ID, ``spiffe://<td>/ns/ambit-system/sa/ambit-operator``. The chain alone
  is not enough, because the same root signs every workload's certificate; and the CA never issues an
  ``ambit-system`` identity through its API (agent/ca/auth.py), only offline.

The server re-reads its files when they change (a renewed Secret is seen by new connections without a
restart); files that do not load are logged and the previous ones kept.
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from agent.identity.ca_client import CA_NAMESPACE
from agent.rpc import StatusCode
from agent.rpc.server import Peer
from hbone.identity import IdentityError, KeyMismatchError, SpiffeId, check_key_pair, split_pem

if TYPE_CHECKING:
    import grpc

log = logging.getLogger(__name__)

OBSERVER_SERVER_NAME = "observer.ambit.internal"
OBSERVER_SERVICE_ACCOUNT = "ambit-agent"  # the server certificate names the agent (the DaemonSet's account)
OPERATOR_SERVICE_ACCOUNT = "ambit-operator"  # no pod runs as it: only `ambit ca --issue operator` makes it


def observer_identity(trust_domain: str) -> SpiffeId:
    return SpiffeId(trust_domain, CA_NAMESPACE, OBSERVER_SERVICE_ACCOUNT)


def operator_identity(trust_domain: str) -> SpiffeId:
    return SpiffeId(trust_domain, CA_NAMESPACE, OPERATOR_SERVICE_ACCOUNT)


class TlsMaterialError(Exception):
    """A certificate, key or CA file that cannot be used; the message names the file."""


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise TlsMaterialError(f"cannot read the {what} {path}: {e.strerror or e}") from None


def read_key_pair(cert_file: Path, key_file: Path) -> tuple[bytes, bytes]:
    """(certificate chain PEM, private key PEM), checked to belong together."""
    chain_pem, key_pem = _read(cert_file, "certificate"), _read(key_file, "private key")
    try:
        split_pem(chain_pem)
    except IdentityError as e:
        raise TlsMaterialError(f"{cert_file}: not a PEM certificate: {e}") from None
    try:
        check_key_pair(chain_pem, key_pem)
    except KeyMismatchError:
        raise TlsMaterialError(f"{key_file} is not the key of the certificate in {cert_file}") from None
    except IdentityError as e:
        raise TlsMaterialError(f"{key_file}: not an unencrypted PEM private key: {e}") from None
    return chain_pem, key_pem


def read_cas(files: Sequence[Path]) -> bytes:
    """The CA certificates of ``files``, concatenated (at least one)."""
    if not files:
        raise TlsMaterialError("no CA certificate file given")
    out = b""
    for path in files:
        pem = _read(path, "CA certificate file")
        try:
            split_pem(pem)
        except IdentityError as e:
            raise TlsMaterialError(f"{path}: not PEM CA certificates: {e}") from None
        out += pem if pem.endswith(b"\n") else pem + b"\n"
    return out


# -- the server ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServerTlsFiles:
    """The agent's ``--observer-tls-cert-file``, ``--observer-tls-key-file``, ``--observer-tls-client-ca-files``."""

    cert: Path
    key: Path
    client_cas: tuple[Path, ...]

    @property
    def paths(self) -> tuple[Path, ...]:
        return (self.cert, self.key, *self.client_cas)


Signature = tuple[tuple[int, int, int], ...]


def _signature(paths: Iterable[Path]) -> Signature:
    """What tells a changed file (following symbolic links, as a Secret volume's are swapped)."""
    out = []
    for path in paths:
        try:
            st = os.stat(path)
            out.append((st.st_ino, st.st_mtime_ns, st.st_size))
        except OSError:
            out.append((0, 0, 0))
    return tuple(out)


class ServerTls:
    """The Observer's TLS server context, requiring a client certificate, taken anew from the files at the first
    handshake after they change; and the check of the client's identity (``admit``)."""

    def __init__(self, files: ServerTlsFiles, allowed_clients: Iterable[SpiffeId]) -> None:
        self.files = files
        self.allowed_clients = frozenset(str(i) for i in allowed_clients)
        self._signature = _signature(files.paths)
        self._current = self._load()  # raises TlsMaterialError: an agent does not start with unusable files

    def _load(self) -> ssl.SSLContext:
        read_key_pair(self.files.cert, self.files.key)  # what is wrong with them, named
        cas = read_cas(self.files.client_cas)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.verify_mode = ssl.CERT_REQUIRED
        context.set_alpn_protocols(["h2"])
        try:
            context.load_verify_locations(cadata=cas.decode())
            context.load_cert_chain(self.files.cert, self.files.key)  # checks the pair again, as read now
        except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
            raise TlsMaterialError(f"{self.files.cert} and {self.files.key} do not load: {e}") from None
        return context

    def current(self) -> ssl.SSLContext:
        """The context of the files as they are now (the previous one while they do not load)."""
        now = _signature(self.files.paths)
        if now != self._signature:
            self._signature = now
            try:
                self._current = self._load()
                log.info("Observer TLS certificate reloaded from %s", self.files.cert)
            except TlsMaterialError as e:
                log.error("keeping the Observer's current TLS certificate: %s", e)
        return self._current

    def listener_context(self) -> ssl.SSLContext:
        """The context to listen with: OpenSSL calls its server-name callback at every ClientHello (with or
        without SNI), which hands the handshake the current context."""
        context = self._load()
        context.sni_callback = self._switch
        return context

    def _switch(self, tls: ssl.SSLObject, server_name: str | None, listener: ssl.SSLContext) -> None:
        tls.context = self.current()


@dataclass(frozen=True)
class Denial:
    code: StatusCode
    message: str


def admit(peer: Peer, allowed: frozenset[str]) -> Denial | None:
    """None when the caller may read flows: over the unix socket, or over TLS (the chain was checked in the
    handshake) with one of the ``allowed`` SPIFFE IDs."""
    if peer.transport == "unix":
        return None
    if peer.identity is not None and peer.identity in allowed:
        return None
    return Denial(StatusCode.PERMISSION_DENIED,
                  f"the client certificate ({peer.identity or 'no SPIFFE ID'}) may not read flows: the Observer "
                  f"serves {' or '.join(sorted(allowed)) or 'nobody'} over TLS (`ambit ca --issue operator`)")


# -- the client ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClientTlsFiles:
    """``ambit observe``'s --tls-ca-cert-files, --tls-client-cert-file, --tls-client-key-file, --tls-server-name."""

    cas: tuple[Path, ...]
    cert: Path
    key: Path
    server_name: str = OBSERVER_SERVER_NAME

    def credentials(self) -> grpc.ChannelCredentials:
        import grpc  # ambit observe's, never the agent's (agent.rpc serves the Observer)

        chain, key = read_key_pair(self.cert, self.key)
        return grpc.ssl_channel_credentials(root_certificates=read_cas(self.cas), private_key=key,
                                            certificate_chain=chain)

    def options(self) -> list[tuple[str, str]]:
        """The server's certificate must carry ``server_name``, whatever address was dialled."""
        return [("grpc.ssl_target_name_override", self.server_name)]
