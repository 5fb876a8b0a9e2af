"""The Observer over TCP serves the operator's certificate only, in real gRPC over mutual TLS on 127.0.0.1:
plaintext, no certificate, another CA's certificate and the mesh's own workload certificates are refused, and
the operator keeps being served; the unix socket needs no certificate; renewed files are used without a
restart; the agent and ``ambit observe`` refuse bad TLS settings with clear errors."""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
import pytest
from cryptography import x509

from agent import __main__ as agent_main
from agent.ca.authority import CertificateAuthority
from agent.ca.issue import issue
from agent.cli import observe as observe_cli
from agent.rpc import StatusCode
from agent.rpc.server import Peer
from agent.telemetry import observer_pb2 as pb
from agent.telemetry import observer_pb2_grpc as pb_grpc
from agent.telemetry.model import Endpoint
from agent.telemetry.observer import ObserverServer
from agent.telemetry.observer_tls import OBSERVER_SERVER_NAME, ClientTlsFiles, ServerTls, admit, operator_identity
from agent.telemetry.recorder import FlowRecorder
from hbone.identity import SpiffeId, WorkloadCertificate
from tests.conftest import ObserverTlsMaterial, issue_observer_tls
from tests.fixtures.certificates import TRUST_DOMAIN

A = Endpoint("10.1.0.7", 41000, "spiffe://cluster.local/ns/shop/sa/client", "shop", "client-1", {"app": "client"})
B = Endpoint("10.2.0.9", 5432, "spiffe://cluster.local/ns/data/sa/db", "data", "db-0", {"app": "db"})
TIMEOUT = 5.0


@dataclass
class Served:
    server: ObserverServer
    tcp: str
    unix: str
    material: ObserverTlsMaterial


async def serve(material: ObserverTlsMaterial, sock: Path) -> ObserverServer:
    rec = FlowRecorder("node-1", capacity=16)
    for _ in range(3):
        rec.start(direction="EGRESS", reporter="source", source=A, destination=B, mtls=True)
    server = ObserverServer(rec)
    await server.start(unix_path=str(sock), tcp="127.0.0.1:0", tls=material.server_tls())
    return server


@pytest.fixture
async def served(tmp_path: Path, observer_tls: ObserverTlsMaterial) -> AsyncIterator[Served]:
    server = await serve(observer_tls, tmp_path / "observer.sock")
    yield Served(server, f"127.0.0.1:{server.tcp_port}", server.addresses[0], observer_tls)
    await server.stop(None)


def credentials(ca: CertificateAuthority, cert: WorkloadCertificate | None) -> grpc.ChannelCredentials:
    if cert is None:
        return grpc.ssl_channel_credentials(root_certificates=ca.root_pem)
    return grpc.ssl_channel_credentials(ca.root_pem, cert.key_pem, cert.chain_pem)


async def flows(channel: grpc.aio.Channel) -> list[pb.GetFlowsResponse]:
    stub = pb_grpc.ObserverStub(channel)  # type: ignore[no-untyped-call]
    return [r async for r in stub.GetFlows(pb.GetFlowsRequest(number=10), timeout=TIMEOUT)]


async def flows_with(target: str, creds: grpc.ChannelCredentials | None,
                     server_name: str = OBSERVER_SERVER_NAME) -> list[pb.GetFlowsResponse]:
    channel = (grpc.aio.insecure_channel(target) if creds is None else
               grpc.aio.secure_channel(target, creds, options=[("grpc.ssl_target_name_override", server_name)]))
    async with channel:
        return await flows(channel)


async def refused(target: str, creds: grpc.ChannelCredentials | None, **kw: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await flows_with(target, creds, **kw)
    return e.value


async def test_the_operator_is_served_over_tls_and_the_socket_needs_no_certificate(served: Served) -> None:
    op = served.material.operator
    async with grpc.aio.secure_channel(served.tcp, op.credentials(), options=op.options()) as channel:
        assert len(await flows(channel)) == 3
        status = await pb_grpc.ObserverStub(channel).ServerStatus(  # type: ignore[no-untyped-call]
            pb.ServerStatusRequest(), timeout=TIMEOUT)
        assert status.node_name == "node-1" and status.num_flows == 3
    async with grpc.aio.insecure_channel(f"unix:{served.unix}") as channel:
        assert len(await flows(channel)) == 3


async def test_clients_without_the_operator_certificate_are_refused(served: Served, ca: CertificateAuthority) -> None:
    # Plaintext: no TLS handshake, no answer.
    assert (await refused(served.tcp, None)).code() == grpc.StatusCode.UNAVAILABLE
    # TLS, but no client certificate: the handshake fails.
    assert (await refused(served.tcp, credentials(ca, None))).code() == grpc.StatusCode.UNAVAILABLE
    # The operator's very identity, from another CA: the chain does not verify.
    other = CertificateAuthority.create(TRUST_DOMAIN)
    forged = other.issue(operator_identity(TRUST_DOMAIN))
    forged_creds = grpc.ssl_channel_credentials(ca.root_pem, forged.key_pem, forged.chain_pem)
    assert (await refused(served.tcp, forged_creds)).code() == grpc.StatusCode.UNAVAILABLE
    # The mesh's own certificates chain to the same root, but are not the operator: denied by identity.
    for identity in (SpiffeId(TRUST_DOMAIN, "shop", "web"), SpiffeId(TRUST_DOMAIN, "ambit-system", "ambit-agent")):
        e = await refused(served.tcp, credentials(ca, ca.issue(identity)))
        assert e.code() == grpc.StatusCode.PERMISSION_DENIED
        assert e.details() == (f"the client certificate ({identity}) may not read flows: the Observer serves "
                               "spiffe://cluster.local/ns/ambit-system/sa/ambit-operator over TLS "
                               "(`ambit ca --issue operator`)")
    web = credentials(ca, ca.issue(SpiffeId(TRUST_DOMAIN, "shop", "web")))
    async with grpc.aio.secure_channel(served.tcp, web, options=served.material.operator.options()) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as status_error:
            await pb_grpc.ObserverStub(channel).ServerStatus(  # type: ignore[no-untyped-call]
                pb.ServerStatusRequest(), timeout=TIMEOUT)
        assert status_error.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # And the operator is still served.
    assert len(await flows_with(served.tcp, served.material.operator.credentials())) == 3


async def test_the_client_checks_the_server_name(served: Served, tmp_path: Path, ca: CertificateAuthority) -> None:
    op = served.material.operator
    e = await refused(served.tcp, op.credentials(), server_name="something.else")
    assert e.code() == grpc.StatusCode.UNAVAILABLE
    # A server with a mesh certificate (no observer name) cannot pose as an agent's Observer.
    impostor_dir = tmp_path / "impostor"
    impostor_dir.mkdir(mode=0o700)
    workload = ca.issue(SpiffeId(TRUST_DOMAIN, "shop", "web"))
    (impostor_dir / "tls.crt").write_bytes(workload.chain_pem)
    (impostor_dir / "tls.key").write_bytes(workload.key_pem)
    files = served.material.server
    impostor = type(files)(impostor_dir / "tls.crt", impostor_dir / "tls.key", files.client_cas)
    server = ObserverServer(FlowRecorder("fake", capacity=4))
    await server.start(tcp="127.0.0.1:0", tls=ServerTls(impostor, [operator_identity(TRUST_DOMAIN)]))
    try:
        e = await refused(f"127.0.0.1:{server.tcp_port}", op.credentials())
        assert e.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(None)


async def test_no_plaintext_tcp_listener(tmp_path: Path) -> None:
    server = ObserverServer(FlowRecorder("node-1", capacity=4))
    with pytest.raises(ValueError, match=r"serves TCP \(127\.0\.0\.1:0\) over mutual TLS only"):
        await server.start(unix_path=str(tmp_path / "o.sock"), tcp="127.0.0.1:0")


def test_admit() -> None:
    operator = "spiffe://cluster.local/ns/ambit-system/sa/ambit-operator"
    allowed = frozenset({operator})
    assert admit(Peer("unix", "unix:/run/o.sock"), allowed) is None
    assert admit(Peer("tls", "127.0.0.1:5", operator), allowed) is None
    for identity in (None, "spiffe://cluster.local/ns/shop/sa/web"):
        denied = admit(Peer("tls", "127.0.0.1:5", identity), allowed)
        assert denied is not None and denied.code == StatusCode.PERMISSION_DENIED
        assert f"({identity or 'no SPIFFE ID'}) may not read flows" in denied.message


def served_serial(port: int, op: ClientTlsFiles, sni: bool = True) -> int:
    """The serial of the certificate the Observer presents to a new connection (a raw TLS handshake, naming the
    server or, ``sni`` False, not)."""
    ctx = ssl.create_default_context(cafile=str(op.cas[0]))
    ctx.check_hostname = sni
    ctx.load_cert_chain(op.cert, op.key)
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw, \
            ctx.wrap_socket(raw, server_hostname=OBSERVER_SERVER_NAME if sni else None) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return int(x509.load_der_x509_certificate(der).serial_number)


def replace(path: Path, data: bytes) -> None:
    """As a Secret volume does: a new file renamed over the old one."""
    tmp = path.with_suffix(".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


async def test_renewed_files_are_served_to_new_connections(tmp_path: Path, ca: CertificateAuthority) -> None:
    material = issue_observer_tls(ca, tmp_path / "tls")
    server = await serve(material, tmp_path / "o.sock")
    try:
        port, op, files = server.tcp_port, material.operator, material.server
        assert port is not None
        first = await asyncio.to_thread(served_serial, port, op)
        issue(ca, "observer", tmp_path / "renewed")
        replace(files.key, (tmp_path / "renewed" / "tls.key").read_bytes())
        replace(files.cert, (tmp_path / "renewed" / "tls.crt").read_bytes())
        second = await asyncio.to_thread(served_serial, port, op)
        assert second != first
        assert await asyncio.to_thread(served_serial, port, op, False) == second  # a client sending no SNI too
        assert second == x509.load_pem_x509_certificate(files.cert.read_bytes()).serial_number
        replace(files.key, ca.issue(SpiffeId(TRUST_DOMAIN, "x", "y")).key_pem)  # a key of another certificate
        assert await asyncio.to_thread(served_serial, port, op) == second  # kept the good pair
        assert len(await flows_with(f"127.0.0.1:{port}", op.credentials())) == 3
    finally:
        await server.stop(None)


def test_the_agent_refuses_a_tcp_observer_without_tls(observer_tls: ObserverTlsMaterial, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    base = ["run", "--node", "n", "--state", "s.yaml", "--ca", "c:1", "--ca-token", "t", "--trust-bundle", "b"]
    files = observer_tls.server
    tls = ["--observer-tls-cert-file", str(files.cert), "--observer-tls-key-file", str(files.key),
           "--observer-tls-client-ca-files", str(files.client_cas[0])]
    assert agent_main.parse_args(base).observer_tls is None  # the default: the unix socket only
    parsed = agent_main.parse_args([*base, "--observer-listen", "0.0.0.0:4244", *tls])
    assert parsed.observer_tls == files
    wrong_key = tmp_path / "other.key"
    shutil.copy(observer_tls.operator.key, wrong_key)
    for argv, message in (
        (["--observer-listen", "0.0.0.0:4244"], "--observer-listen 0.0.0.0:4244: the Observer serves TCP over mutual "
         "TLS only; missing --observer-tls-cert-file, --observer-tls-key-file, --observer-tls-client-ca-files"),
        (tls, "--observer-tls-cert-file, --observer-tls-key-file, --observer-tls-client-ca-files without "
         "--observer-listen"),
        (["--observer-listen", "0.0.0.0:4244", *tls[:3], str(wrong_key), *tls[4:]],
         f"{wrong_key} is not the key of the certificate in {files.cert}"),
        (["--observer-listen", "0.0.0.0:4244", *tls[:-1], str(tmp_path / "nope.pem")],
         f"cannot read the CA certificate file {tmp_path / 'nope.pem'}"),
    ):
        with pytest.raises(SystemExit):
            agent_main.parse_args([*base, *argv])
        assert message in capsys.readouterr().err


async def test_ambit_observe_needs_the_operator_certificate_for_tcp(served: Served, ca: CertificateAuthority,
                                                                    tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AMBIT_TLS_CLIENT_CERT_FILE", "AMBIT_TLS_CLIENT_KEY_FILE", "AMBIT_TLS_CA_CERT_FILES"):
        monkeypatch.delenv(name, raising=False)

    async def run(*argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        rc = await asyncio.to_thread(observe_cli.main, ["--all", "-o", "json", *argv], out=out, err=err)
        return rc, out.getvalue(), err.getvalue()

    rc, _, err = await run("--server", served.tcp)
    assert rc == 2 and err == (f"ambit observe: {served.tcp}: an agent's TCP observer serves mutual TLS only; "
                               "missing --tls-client-cert-file, --tls-client-key-file, --tls-ca-cert-files (the "
                               "operator certificate: `ambit ca --issue operator`; or read the node's unix socket)\n")
    rc, out, err = await run("--server", served.unix)  # the socket: no certificate needed
    assert (rc, err) == (0, "") and len(out.splitlines()) == 3
    rc, out, err = await run("--server", served.tcp, *served.material.observe_args())
    assert (rc, err) == (0, "") and len(out.splitlines()) == 3
    web = ca.issue(SpiffeId(TRUST_DOMAIN, "shop", "web"))
    (tmp_path / "web.crt").write_bytes(web.chain_pem)
    (tmp_path / "web.key").write_bytes(web.key_pem)
    args = served.material.observe_args()
    rc, out, err = await run("--server", served.tcp, "--server", served.unix, "--tls-client-cert-file",
                             str(tmp_path / "web.crt"), "--tls-client-key-file", str(tmp_path / "web.key"), *args[4:])
    assert rc == 1 and f"ambit observe: {served.tcp}: PERMISSION_DENIED: the client certificate " \
                       "(spiffe://cluster.local/ns/shop/sa/web) may not read flows" in err
    assert len(out.splitlines()) == 3  # the socket's flows are still printed
    rc, _, err = await run("--server", served.tcp, *args[:-1], str(tmp_path / "missing.crt"))
    assert rc == 2 and f"cannot read the CA certificate file {tmp_path / 'missing.crt'}" in err
