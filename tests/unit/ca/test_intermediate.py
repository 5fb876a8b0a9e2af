"""The CA with its root offline: an intermediate (Istio's plug-in layout) signs; workloads' chains run leaf,
intermediate, root; agents trusting only the root verify the CA and each other in real TLS handshakes."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import shutil
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from agent.ca import __main__ as ca_main
from agent.ca.auth import NodeAuthorizer, NodeTokenFile, PodStateFile
from agent.ca.authority import CaMaterialError, CertificateAuthority
from agent.ca.service import CaServer
from agent.identity.ca_client import CaClient
from agent.identity.keys import make_csr, new_key
from agent.identity.manager import CertificateManager
from agent.identity.x509ops import verify_chain
from hbone.identity import IdentityError, SpiffeId, TrustBundle, client_context, server_context, verify_peer

TD = "cluster.local"
WEB, DB = SpiffeId(TD, "shop", "web"), SpiffeId(TD, "shop", "db")
IO_TIMEOUT = 10.0


@pytest.fixture(scope="module")
def root() -> CertificateAuthority:
    return CertificateAuthority.create(TD)


@pytest.fixture(scope="module")
def cluster(root: CertificateAuthority) -> CertificateAuthority:
    return root.create_intermediate()


def certs(pems: list[bytes]) -> list[x509.Certificate]:
    return [c for pem in pems for c in x509.load_pem_x509_certificates(pem)]


def test_chains_run_leaf_intermediate_root(root: CertificateAuthority, cluster: CertificateAuthority) -> None:
    assert cluster.root_key is None and cluster.intermediate is not None
    leaf, middle, top = certs(cluster.sign_csr(make_csr(WEB, new_key()), WEB))
    assert top == root.root_cert and middle == cluster.intermediate.cert
    leaf.verify_directly_issued_by(middle)
    middle.verify_directly_issued_by(top)
    constraints = middle.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0  # it signs workloads, not further CAs
    assert middle.not_valid_after_utc <= root.root_cert.not_valid_after_utc
    verify_chain([leaf, middle], root.root_pem)  # what an agent holding only the root accepts
    with pytest.raises(IdentityError, match="does not chain to any"):
        verify_chain([leaf, middle], CertificateAuthority.create(TD).root_pem)
    with pytest.raises(IdentityError):
        verify_chain([leaf], root.root_pem)  # without the intermediate there is no path
    # A short-lived intermediate caps what it signs.
    brief = root.create_intermediate(dt.timedelta(hours=2))
    (short, *_) = certs(brief.sign_csr(make_csr(WEB, new_key()), WEB, dt.timedelta(days=30)))
    assert brief.intermediate is not None and short.not_valid_after_utc == brief.intermediate.cert.not_valid_after_utc


def test_plug_in_layout_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    offline, plug = tmp_path / "offline-root", tmp_path / "cluster-ca"
    ca_main.main(["--dir", str(offline), "--init"])
    ca_main.main(["--dir", str(offline), "--issue", "intermediate", "--out", str(plug)])
    assert sorted(p.name for p in plug.iterdir()) == ["ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem"]
    assert stat.S_IMODE(plug.stat().st_mode) == 0o700 and stat.S_IMODE((plug / "ca-key.pem").stat().st_mode) == 0o600
    assert (plug / "root-cert.pem").read_bytes() == (offline / "root-cert.pem").read_bytes()
    assert certs([(plug / "cert-chain.pem").read_bytes()]) == certs([(plug / "ca-cert.pem").read_bytes(),
                                                                     (plug / "root-cert.pem").read_bytes()])
    loaded = CertificateAuthority.load(plug, TD)
    assert loaded.intermediate is not None and loaded.root_key is None
    assert loaded.root_pem == (offline / "root-cert.pem").read_bytes()
    ca_main.main(["--dir", str(plug), "--init"])  # a CA is there: kept, and no root made next to it
    assert "kept the intermediate CA (its root offline) for cluster.local" in capsys.readouterr().out
    assert not (plug / "root-key.pem").exists()
    with pytest.raises(SystemExit, match="an intermediate is made with the root's key"):
        ca_main.main(["--dir", str(plug), "--issue", "intermediate", "--out", str(tmp_path / "again")])


def test_unusable_plug_in_files_are_named(tmp_path: Path, root: CertificateAuthority,
                                          cluster: CertificateAuthority) -> None:
    plug = tmp_path / "plug"
    cluster.save(plug)
    other = CertificateAuthority.create(TD).create_intermediate()
    broken = tmp_path / "broken"

    def variant(change: str) -> Path:
        shutil.rmtree(broken, ignore_errors=True)
        shutil.copytree(plug, broken)
        broken.chmod(0o700)
        if change == "key":
            other.save(tmp_path / "other")
            shutil.copy(tmp_path / "other" / "ca-key.pem", broken / "ca-key.pem")
        elif change == "root":
            (broken / "root-cert.pem").write_bytes(CertificateAuthority.create(TD).root_pem)
        elif change == "no-root":
            (broken / "root-cert.pem").unlink()
        elif change == "leaf":
            (broken / "ca-cert.pem").write_bytes(cluster.issue(WEB).chain_pem.split(b"-----END CERTIFICATE-----")[0]
                                                 + b"-----END CERTIFICATE-----\n")
        return broken

    for change, message in (("key", "ca-key.pem is not the key of the certificate next to it"),
                            ("root", "ca-cert.pem does not chain to a root in"),
                            ("no-root", "root-cert.pem is missing"),
                            ("leaf", "ca-cert.pem is not a CA certificate")):
        with pytest.raises(CaMaterialError, match=re.escape(message)):
            CertificateAuthority.load(variant(change), TD)
    with pytest.raises(SystemExit, match=r"root-cert\.pem is missing"):  # the CA command says it, and stops
        ca_main.main(["--dir", str(variant("no-root")), "--listen", "127.0.0.1:0", "--tokens", "t", "--pods", "p"])


@pytest.fixture
async def cluster_ca(tmp_path: Path, cluster: CertificateAuthority) -> AsyncIterator[str]:
    """The CA with the intermediate, over gRPC on loopback; node-a runs shop/web and shop/db."""
    tokens, pods = tmp_path / "tokens.yaml", tmp_path / "pods.yaml"
    tokens.write_text(yaml.safe_dump({"token-a": "node-a"}))
    pods.write_text(yaml.safe_dump_all([
        {"kind": "Pod", "metadata": {"name": sa, "namespace": "shop"},
         "spec": {"nodeName": "node-a", "serviceAccountName": sa}, "status": {"phase": "Running"}}
        for sa in ("web", "db")]))
    server = await CaServer.start(cluster, NodeTokenFile(tokens), NodeAuthorizer(PodStateFile(pods)), "127.0.0.1:0")
    yield f"127.0.0.1:{server.port}"
    await server.stop(None)


async def test_agents_trusting_only_the_root_get_certificates_and_handshake(
        cluster_ca: str, root: CertificateAuthority) -> None:
    bundle = TrustBundle(TD, root.root_pem)  # the agents' trust bundle: the offline root, nothing else
    client = CaClient(cluster_ca, bundle, lambda: "token-a")  # the CA's serving chain checked against the root
    manager = CertificateManager(client, bundle)
    try:
        web, db = await manager.get(WEB), await manager.get(DB)
    finally:
        await manager.close()
        await client.close()
    assert len(x509.load_pem_x509_certificates(web.chain_pem)) == 2  # presented: leaf and intermediate

    seen: asyncio.Future[SpiffeId] = asyncio.get_running_loop().create_future()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.set_result(verify_peer(writer.get_extra_info("ssl_object"), bundle))
        writer.write(await reader.readexactly(5))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_context(db, bundle))
    port = server.sockets[0].getsockname()[1]
    try:
        async with asyncio.timeout(IO_TIMEOUT):
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_context(web, bundle))
            assert verify_peer(writer.get_extra_info("ssl_object"), bundle, expected=DB) == DB
            writer.write(b"hello")
            assert await reader.readexactly(5) == b"hello"
            assert await seen == WEB
            writer.close()
    finally:
        server.close()
        await server.wait_closed()


def test_component_certificates_carry_the_intermediate(tmp_path: Path, cluster: CertificateAuthority) -> None:
    plug = tmp_path / "plug"
    cluster.save(plug)
    for kind in ("observer", "operator"):
        ca_main.main(["--dir", str(plug), "--issue", kind, "--out", str(tmp_path / kind)])
        out = tmp_path / kind
        leaf, middle = x509.load_pem_x509_certificates((out / "tls.crt").read_bytes())
        assert cluster.intermediate is not None and middle == cluster.intermediate.cert
        assert (out / "ca.crt").read_bytes() == cluster.root_pem
        assert stat.S_IMODE((out / "tls.key").stat().st_mode) == 0o600
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        if kind == "observer":
            assert san.get_values_for_type(x509.DNSName) == ["observer.ambit.internal"]
            assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
                "spiffe://cluster.local/ns/ambit-system/sa/ambit-agent"]
        else:
            assert san.get_values_for_type(x509.DNSName) == []
            assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
                "spiffe://cluster.local/ns/ambit-system/sa/ambit-operator"]
