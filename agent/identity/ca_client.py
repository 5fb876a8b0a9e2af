"""The node agent's side of IstioCertificateService: asks the CA to sign a CSR for a workload identity.

The channel is TLS with server authentication only: the CA's serving certificate must chain to the trust
bundle and carry the DNS name ``ambit-ca.ambit-system.svc``, checked whatever address the CA is dialled on (as
gRPC's ``grpc.ssl_target_name_override`` did). The node agent proves who it is with a bearer token read from its
token source on every call, so a rotated (projected) token is used as soon as it is written. The call is gRPC,
made with ``agent.rpc`` (not the grpc package: see there).
"""

from __future__ import annotations

import datetime as dt
import ssl
from collections.abc import Callable
from pathlib import Path

from google.protobuf.message import DecodeError

from agent.identity import ca_pb2
from agent.rpc import RpcError, StatusCode
from agent.rpc.client import Channel
from hbone import SpiffeId, TrustBundle, parse_host_port

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

    def __init__(self, code: StatusCode, details: str) -> None:
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
    """gRPC client of Ambit's (or Istio's) CA. ``address`` is ``host:port`` (ValueError otherwise)."""

    def __init__(self, address: str, bundle: TrustBundle, token_source: TokenSource, *,
                 server_name: str = CA_SERVER_NAME, timeout: float = 10.0) -> None:
        self.address = address
        self._host, self._port = parse_host_port(address, what="the CA address")
        self._bundle = bundle
        self._token_source = token_source
        self._server_name = server_name
        self._timeout = timeout
        self._channel: Channel | None = None

    def set_trust_bundle(self, bundle: TrustBundle) -> None:
        """Verify the CA against ``bundle`` from the next call on (a root rotation)."""
        if bundle == self._bundle:
            return
        self._bundle = bundle
        old, self._channel = self._channel, None
        if old is not None:
            old.retire()  # calls in flight finish on the old channel

    def _get_channel(self) -> Channel:
        if self._channel is None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # the CA's certificate and name are checked
            context.load_verify_locations(cadata=self._bundle.roots_pem.decode())
            context.set_alpn_protocols(["h2"])
            self._channel = Channel(self._host, self._port, context, server_hostname=self._server_name,
                                    connect_timeout=self._timeout)
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
        try:
            reply = await self._get_channel().unary(METHOD, request.SerializeToString(),
                                                    metadata=[("authorization", f"Bearer {token}")],
                                                    timeout=self._timeout)
            response = ca_pb2.IstioCertificateResponse.FromString(reply)
        except RpcError as e:
            raise CaRequestError(e.code, e.details) from None
        except DecodeError as e:
            raise CaClientError(f"the CA's answer does not parse: {e}") from None
        if not response.cert_chain:
            raise CaClientError("the CA answered with an empty certificate chain")
        return [pem.encode() for pem in response.cert_chain]

    async def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
