"""HBONE: HTTP/2 CONNECT tunnels over mutual TLS with SPIFFE identities (Istio ambient's tunnel).

What users of the library need is here; the modules behind it are:

* ``hbone.protocol`` and ``hbone.events``: the HTTP/2 CONNECT protocol, free of I/O, and its events;
* ``hbone.tunnel``: a TLS connection carrying streams, and ``StreamHandler``, what consumes one stream;
* ``hbone.relay``: the TCP relay, the stream handler of an L4 tunnel;
* ``hbone.server``, ``hbone.client``, ``hbone.pool``, ``hbone.forward``: the server, tunnels to a server,
  pooled as ztunnel pools them, and a fixed-target forwarder;
* ``hbone.identity``: SPIFFE IDs, workload certificates, trust bundles, mutual-TLS contexts;
* ``hbone.sockets``, ``hbone.accept``, ``hbone.memory``: dialling, accepting and allocator settings;
* ``hbone.addresses``: ``ip:port`` and ``[ipv6]:port`` text, canonical IPs.
"""

from hbone.accept import Acceptor
from hbone.addresses import canonical_address, canonical_ip, format_address, parse_host_port
from hbone.authority import Authority
from hbone.client import HboneError, StreamFailed, StreamRefused, open_tunnel, request_headers
from hbone.events import Data
from hbone.forward import Forwarder
from hbone.identity import IdentityError, SpiffeId, TrustBundle, WorkloadCertificate, identity_of
from hbone.memory import keep_buffers_on_heap
from hbone.pool import Pool, PoolKey
from hbone.protocol import ProtocolError, Settings
from hbone.relay import TCP_WRITE_HIGH_WATER, Relay
from hbone.server import (
    CertificateLookup,
    EstablishedHook,
    HboneServer,
    InboundRequest,
    PolicyHook,
    UpstreamConnector,
    connect_plain,
    fixed_certificate,
)
from hbone.sockets import (
    abort_with_reset,
    accepted_addresses,
    close_with_reset,
    dial,
    linger_reset,
    set_transparent,
)
from hbone.tunnel import StreamHandler, Tunnel

__all__ = [
    "TCP_WRITE_HIGH_WATER",
    "Acceptor",
    "Authority",
    "CertificateLookup",
    "Data",
    "EstablishedHook",
    "Forwarder",
    "HboneError",
    "HboneServer",
    "IdentityError",
    "InboundRequest",
    "PolicyHook",
    "Pool",
    "PoolKey",
    "ProtocolError",
    "Relay",
    "Settings",
    "SpiffeId",
    "StreamFailed",
    "StreamHandler",
    "StreamRefused",
    "TrustBundle",
    "Tunnel",
    "UpstreamConnector",
    "WorkloadCertificate",
    "abort_with_reset",
    "accepted_addresses",
    "canonical_address",
    "canonical_ip",
    "close_with_reset",
    "connect_plain",
    "dial",
    "fixed_certificate",
    "format_address",
    "identity_of",
    "keep_buffers_on_heap",
    "linger_reset",
    "open_tunnel",
    "parse_host_port",
    "request_headers",
    "set_transparent",
]
