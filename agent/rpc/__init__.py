"""gRPC over HTTP/2 for the node agent: the Observer's server and the CA's client, on h2 and asyncio.

The agent speaks gRPC in two places only, serving the Observer API (one unary and one server-streaming method)
and asking the CA for certificates (one unary call). The grpc package did both at a cost of ~9 MB of the idle
agent's memory (its C core's pages, its Python modules, seven threads): issue 11's bound is 40 MB. What is
used of gRPC's wire protocol (PROTOCOL-HTTP2.md) is small and lives here:

- ``status``    status codes, ``RpcError``, the grpc-message and grpc-timeout encodings
- ``wire``      length-prefixed messages and the checks of a request's headers (no I/O)
- ``transport`` an HTTP/2 connection on an asyncio transport: flow-controlled sending, back-pressure
- ``server``    ``RpcServer``: unary and server-streaming methods on unix sockets and TLS listeners
- ``client``    ``Channel``: unary calls over one TLS connection, opened again when it ends

The CA server and ``ambit observe`` (other processes) keep using grpc; the tests use grpc's own client and
server against these, so both ends are checked against the reference implementation.
"""

from agent.rpc.status import RpcError, StatusCode

__all__ = ["RpcError", "StatusCode"]
