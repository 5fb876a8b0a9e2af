"""The node agent's side of IstioCertificateService: asks the CA to sign a CSR for a workload identity.

The channel is TLS with server authentication only: the CA's serving certificate must chain to the trust
bundle and carry the DNS name ``ambit-ca.ambit-system.svc`` (gRPC checks it through
``grpc.ssl_target_name_override``, whatever address the CA is dialled on). The node agent proves who it is
with a bearer token read from its token source on every call, so a rotated (projected) token is used as
soon as it is written.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from pathlib import Path

import grpc
import grpc.aio

from agent.identity import ca_pb2, ca_pb2_grpc
from hbone import SpiffeId, TrustBundle

CA_NAMESPACE = "ambit-system"
CA_SERVICE_ACCOUNT = "ambit-ca"
CA_SERVER_NAME = f"{CA_SERVICE_ACCOUNT}.{CA_NAMESPACE}.svc"
IMPERSONATED_IDENTITY = "ImpersonatedIdentity"
METHOD = "/istio.v1.auth.IstioCertificateService/CreateCertificate"

TokenSource = Path | Callable[[], str]


class CaClientError(Exception):
    """A certificate could not be obtained from the CA."""


class CaRequestError(CaClientError):
    """The CA (or the channel to it) answered a request with a gRPC error."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


def _read_token(source: TokenSource) -> str:
    if callable(source):
        return source().strip()
    try:
        return source.read_text().strip()
    except OSError as e:
        raise CaClientError(f"cannot read the CA token from {source}: {e.strerror}") from None


class CaClient:
    """gRPC client of Ambit's (or Istio's) CA."""

    def __init__(self, address: str, bundle: TrustBundle, token_source: TokenSource, *,
                 server_name: str = CA_SERVER_NAME, timeout: float = 10.0) -> None:
        self.address = address
        self._bundle = bundle
        self._token_source = token_source
        self._server_name = server_name
        self._timeout = timeout
        self._channel: grpc.aio.Channel | None = None
        self._closing: set[asyncio.Task[None]] = set()

    def set_trust_bundle(self, bundle: TrustBundle) -> None:
        """Verify the CA against ``bundle`` from the next call on (a root rotation)."""
        if bundle == self._bundle:
            return
        self._bundle = bundle
        old, self._channel = self._channel, None
        if old is not None:  # let calls in flight finish on the old channel
            # A channel only exists once a call ran, so there is a loop to close it on.
            task = asyncio.get_running_loop().create_task(old.close(grace=self._timeout))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def _get_channel(self) -> grpc.aio.Channel:
        if self._channel is None:
            creds = grpc.ssl_channel_credentials(root_certificates=self._bundle.roots_pem)
            self._channel = grpc.aio.secure_channel(
                self.address, creds, options=[("grpc.ssl_target_name_override", self._server_name)])
        return self._channel

    async def create_certificate(self, csr_pem: bytes, identity: SpiffeId | None,
                                 validity: dt.timedelta | None = None) -> list[bytes]:
        """Have the CA sign ``csr_pem`` for ``identity`` (None: the CSR's own SAN). ``validity`` None or
        zero asks for the CA's default. Returns the PEM chain, leaf first and root last."""
        token = _read_token(self._token_source)
        request = ca_pb2.IstioCertificateRequest(
            csr=csr_pem.decode(),
            validity_duration=int(validity.total_seconds()) if validity else 0,
            metadata={IMPERSONATED_IDENTITY: str(identity)} if identity is not None else None)
        stub = ca_pb2_grpc.IstioCertificateServiceStub(self._get_channel())  # type: ignore[no-untyped-call]
        try:
            response: ca_pb2.IstioCertificateResponse = await stub.CreateCertificate(
                request, metadata=(("authorization", f"Bearer {token}"),), timeout=self._timeout)
        except grpc.aio.AioRpcError as e:
            raise CaRequestError(e.code(), e.details() or "") from None
        if not response.cert_chain:
            raise CaClientError("the CA answered with an empty certificate chain")
        return [pem.encode() for pem in response.cert_chain]

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close(grace=None)
            self._channel = None
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
