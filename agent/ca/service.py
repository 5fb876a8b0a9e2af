"""Ambit's CA as a gRPC service: IstioCertificateService/CreateCertificate over TLS.

Each request is decided in a fixed order, and every decision is logged with the peer, the caller's node
and the identity asked for:

1. the bearer token names a caller (else UNAUTHENTICATED);
2. the CSR parses, the identity (``ImpersonatedIdentity`` in the request metadata, as ztunnel sends, or
   else the CSR's URI SAN) is a SPIFFE ID of this trust domain, and the validity is sane (else
   INVALID_ARGUMENT);
3. the caller's node runs a pod with that identity (else PERMISSION_DENIED);
4. the authority signs (a CSR it refuses: INVALID_ARGUMENT).

A file the CA decides with that cannot be read gives UNAVAILABLE (the caller retries). TLS authenticates
the server only: the CA presents a certificate from its own root for
``spiffe://<td>/ns/ambit-system/sa/ambit-ca`` with the DNS name ``ambit-ca.ambit-system.svc``, renewed at
half of its lifetime (and when the root changes) without a restart.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import cast

import grpc
import grpc.aio
from cryptography import x509

from agent.ca.auth import (
    AuthenticationError,
    Authenticator,
    AuthorizationError,
    Authorizer,
    Caller,
)
from agent.ca.authority import DEFAULT_TTL, MAX_TTL, CertificateAuthority, CsrError
from agent.identity import ca_pb2, ca_pb2_grpc
from agent.identity.ca_client import CA_NAMESPACE, CA_SERVER_NAME, CA_SERVICE_ACCOUNT, IMPERSONATED_IDENTITY
from agent.sources.watched import SourceError
from hbone import IdentityError, SpiffeId, WorkloadCertificate

log = logging.getLogger("ambit.ca")

MAX_REQUEST_BYTES = 64 * 1024  # a CSR is well under 2 KiB

Context = grpc.aio.ServicerContext[ca_pb2.IstioCertificateRequest, ca_pb2.IstioCertificateResponse]


class Refused(Exception):
    """A request the CA turns down, with the gRPC status and a message for the caller."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class _Decision:
    """What is known about a request so far, for the log line."""

    peer: str
    caller: Caller | None = None
    identity: SpiffeId | str | None = None

    def __str__(self) -> str:
        node = self.caller.node_name if self.caller else "-"
        return f"peer={self.peer} node={node} identity={self.identity or '-'}"


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The token of the single ``authorization: Bearer <token>`` entry."""
    values = [v for k, v in (metadata or ()) if k.lower() == "authorization"]
    if not values:
        raise Refused(grpc.StatusCode.UNAUTHENTICATED, "missing 'authorization: Bearer <token>' metadata")
    if len(values) > 1:
        raise Refused(grpc.StatusCode.UNAUTHENTICATED, "more than one authorization metadata entry")
    value = values[0] if isinstance(values[0], str) else values[0].decode(errors="replace")
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Refused(grpc.StatusCode.UNAUTHENTICATED, "authorization metadata must be 'Bearer <token>'")
    return token.strip()


def _invalid(message: str) -> Refused:
    return Refused(grpc.StatusCode.INVALID_ARGUMENT, message)


def requested_identity(request: ca_pb2.IstioCertificateRequest) -> SpiffeId:
    """``ImpersonatedIdentity`` from the request metadata, else the CSR's single URI SAN."""
    if not request.csr:
        raise _invalid("csr is empty")
    try:
        csr = x509.load_pem_x509_csr(request.csr.encode())
    except ValueError as e:
        raise _invalid(f"csr is not a PEM certificate request: {e}") from None
    if IMPERSONATED_IDENTITY in request.metadata.fields:  # (indexing a missing key would add it)
        field = request.metadata.fields[IMPERSONATED_IDENTITY]
        if field.WhichOneof("kind") != "string_value":
            raise _invalid(f"metadata {IMPERSONATED_IDENTITY} must be a string (a SPIFFE ID)")
        uri = field.string_value
    else:
        try:
            san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        except (x509.ExtensionNotFound, ValueError):
            uris = []
        if len(uris) != 1:
            raise _invalid(f"no {IMPERSONATED_IDENTITY} in the request metadata, and the CSR carries "
                           f"{len(uris)} URI SANs instead of exactly one SPIFFE ID")
        uri = uris[0]
    try:
        return SpiffeId.parse(uri)
    except IdentityError as e:
        raise _invalid(str(e)) from None


def requested_ttl(seconds: int, default: dt.timedelta = DEFAULT_TTL) -> dt.timedelta:
    """``validity_duration`` as a lifetime: 0 is the default, more than the authority's maximum is capped."""
    if seconds < 0:
        raise _invalid(f"validity_duration must be >= 0 seconds (0 means the default), got {seconds}")
    if seconds == 0:
        return default
    return dt.timedelta(seconds=min(seconds, int(MAX_TTL.total_seconds())))


class CertificateService(ca_pb2_grpc.IstioCertificateServiceServicer):
    """Decides and signs CreateCertificate requests."""

    def __init__(self, authority: CertificateAuthority, authenticator: Authenticator, authorizer: Authorizer,
                 *, default_ttl: dt.timedelta = DEFAULT_TTL) -> None:
        self.authority = authority
        self._authenticator = authenticator
        self._authorizer = authorizer
        self._default_ttl = default_ttl

    async def CreateCertificate(self, request: ca_pb2.IstioCertificateRequest,
                                context: Context) -> ca_pb2.IstioCertificateResponse:
        decision = _Decision(peer=context.peer())
        try:
            chain, ttl = await self._decide(request, context.invocation_metadata(), decision)
        except Refused as r:
            log.warning("refused %s: %s %s", decision, r.code.name, r.message)
            await context.abort(r.code, r.message)
        except Exception:
            log.exception("failed %s", decision)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error in the CA, see its log")
        leaf = x509.load_pem_x509_certificate(chain[0])
        log.info("issued %s ttl=%ds serial=%x not_after=%s", decision, ttl.total_seconds(),
                 leaf.serial_number, leaf.not_valid_after_utc.isoformat())
        return ca_pb2.IstioCertificateResponse(cert_chain=[pem.decode() for pem in chain])

    async def _decide(self, request: ca_pb2.IstioCertificateRequest,
                      metadata: Iterable[tuple[str, str | bytes]] | None,
                      decision: _Decision) -> tuple[list[bytes], dt.timedelta]:
        token = bearer_token(metadata)
        try:
            decision.caller = await self._authenticator.authenticate(token)
        except AuthenticationError as e:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, str(e)) from None
        except SourceError as e:
            log.error("cannot authenticate: %s", e)
            raise Refused(grpc.StatusCode.UNAVAILABLE, "the CA cannot check tokens right now") from None

        if IMPERSONATED_IDENTITY in request.metadata.fields:  # logged even when it does not parse
            decision.identity = request.metadata.fields[IMPERSONATED_IDENTITY].string_value or None
        identity = requested_identity(request)
        decision.identity = identity
        if identity.trust_domain != self.authority.trust_domain:
            raise _invalid(f"identity {identity} is outside trust domain {self.authority.trust_domain!r}")
        ttl = requested_ttl(request.validity_duration, self._default_ttl)

        try:
            await self._authorizer.authorize(decision.caller, identity)
        except AuthorizationError as e:
            raise Refused(grpc.StatusCode.PERMISSION_DENIED, str(e)) from None
        except SourceError as e:
            log.error("cannot authorize: %s", e)
            raise Refused(grpc.StatusCode.UNAVAILABLE, "the CA cannot look up pods right now") from None

        try:
            return self.authority.sign_csr(request.csr.encode(), identity, ttl), min(ttl, MAX_TTL)
        except CsrError as e:
            raise _invalid(str(e)) from None


def ca_identity(trust_domain: str) -> SpiffeId:
    return SpiffeId(trust_domain, CA_NAMESPACE, CA_SERVICE_ACCOUNT)


class ServingCertificate:
    """The CA's own TLS certificate, re-issued at half of its lifetime or when the authority's root
    changes. gRPC asks ``fetch`` at the start of every handshake, on one of its own threads."""

    def __init__(self, authority: CertificateAuthority, dns_names: Sequence[str] = (CA_SERVER_NAME,),
                 clock: Callable[[], dt.datetime] | None = None) -> None:
        self._authority = authority
        self._dns_names = tuple(dns_names)
        self._clock = clock or authority.clock
        self._lock = threading.Lock()
        self.current, self._root = self._issue()

    def _issue(self) -> tuple[WorkloadCertificate, bytes]:
        root = self._authority.root_pem
        cert = self._authority.issue(ca_identity(self._authority.trust_domain), dns_names=self._dns_names)
        log.info("serving certificate for %s %s, valid until %s", cert.identity, list(self._dns_names),
                 cert.not_after.isoformat())
        return cert, root

    def config(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(self.current.key_pem, self.current.chain_pem)])

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """A new configuration when the certificate is due, else None (keep the current one)."""
        with self._lock:
            if self._clock() < self.current.refresh_at and self._root == self._authority.root_pem:
                return None
            self.current, self._root = self._issue()
            return self.config()

    def credentials(self) -> grpc.ServerCredentials:
        # grpc-stubs types the fetcher as never returning None; gRPC documents None as "unchanged".
        fetcher = cast(Callable[[], grpc.ServerCertificateConfiguration], self.fetch)
        return grpc.dynamic_ssl_server_credentials(self.config(), fetcher)


class CaServer:
    """A running CA: ``await CaServer.start(...)``, then ``port``, ``stop()``."""

    def __init__(self, server: grpc.aio.Server, port: int, service: CertificateService,
                 serving: ServingCertificate) -> None:
        self._server = server
        self.port = port
        self.service = service
        self.serving = serving

    @classmethod
    async def start(cls, authority: CertificateAuthority, authenticator: Authenticator,
                    authorizer: Authorizer, listen: str = "127.0.0.1:0", *,
                    dns_names: Sequence[str] = (CA_SERVER_NAME,),
                    default_ttl: dt.timedelta = DEFAULT_TTL) -> CaServer:
        service = CertificateService(authority, authenticator, authorizer, default_ttl=default_ttl)
        serving = ServingCertificate(authority, dns_names)
        server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
            ("grpc.so_reuseport", 0),  # a second CA on the same port must fail, not share it
        ])
        ca_pb2_grpc.add_IstioCertificateServiceServicer_to_server(service, server)  # type: ignore[no-untyped-call]
        try:
            port = server.add_secure_port(listen, serving.credentials())
        except RuntimeError as e:
            raise OSError(f"cannot listen on {listen}: {e}") from None
        if port == 0:
            raise OSError(f"cannot listen on {listen}")
        await server.start()
        log.info("CA for trust domain %r listening on %s (port %d)", authority.trust_domain, listen, port)
        return cls(server, port, service, serving)

    async def stop(self, grace: float | None = 5.0) -> None:
        await self._server.stop(grace)

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()
