"""A real CA for the CA tests: gRPC over TLS on 127.0.0.1 (ephemeral port), a token file and a pod file.

No tests here; test_ca_service.py and test_ca_manager.py build on it.

Nodes and pods of the lab:
  node-a: shop/web (Running), misc/default (a pod without serviceAccountName), shop/batch (Succeeded)
  node-b: shop/db
  unscheduled: shop/pending
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
import yaml
from cryptography.hazmat.primitives.asymmetric import ec

from agent.ca.auth import NodeAuthorizer, NodeTokenFile, PodStateFile
from agent.ca.authority import CertificateAuthority
from agent.ca.service import CaServer
from agent.identity import ca_pb2, ca_pb2_grpc
from agent.identity.ca_client import CA_SERVER_NAME, CaClient
from hbone.identity import SpiffeId, TrustBundle

TOKENS = {"token-of-node-a": "node-a", "token-of-node-b": "node-b"}


def pod(name: str, namespace: str | None, node: str | None, sa: str | None = None,
        phase: str = "Running") -> dict[str, object]:
    meta: dict[str, object] = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    spec: dict[str, object] = {"containers": [{"name": "app", "image": "app:1"}]}
    if node is not None:
        spec["nodeName"] = node
    if sa is not None:
        spec["serviceAccountName"] = sa
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec, "status": {"phase": phase}}


PODS = [
    pod("web-1", "shop", "node-a", "web"),
    pod("plain", "misc", "node-a"),
    pod("batch-job", "shop", "node-a", "batch", phase="Succeeded"),
    pod("db-0", "shop", "node-b", "db"),
    pod("pending", "shop", None, "pending", phase="Pending"),
]


def rewrite(path: Path, text: str) -> None:
    """Replace a file's content and move its mtime forward, so that a change is seen even when the
    filesystem's timestamp granularity is coarse."""
    old = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    later = max(old + 1_000_000_000, path.stat().st_mtime_ns)
    os.utime(path, ns=(later, later))


def write_pods(path: Path, pods: list[dict[str, object]]) -> None:
    rewrite(path, yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": pods}))


@dataclass
class Lab:
    authority: CertificateAuthority
    server: CaServer
    tokens: Path
    pods: Path
    dir: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def bundle(self) -> TrustBundle:
        return self.authority.trust_bundle

    def identity(self, ns: str, sa: str) -> SpiffeId:
        return SpiffeId(self.authority.trust_domain, ns, sa)

    def token_file(self, token: str, name: str = "token") -> Path:
        path = self.dir / name
        rewrite(path, token + "\n")
        return path

    def client(self, token: str = "token-of-node-a", bundle: TrustBundle | None = None) -> CaClient:
        return CaClient(self.address, bundle or self.bundle, self.token_file(token, f"token-{token}"))

    async def raw_call(self, request: ca_pb2.IstioCertificateRequest,
                       metadata: tuple[tuple[str, str], ...] = ()) -> ca_pb2.IstioCertificateResponse:
        """One CreateCertificate with exactly the given request and metadata (no client-side help)."""
        creds = grpc.ssl_channel_credentials(root_certificates=self.bundle.roots_pem)
        async with grpc.aio.secure_channel(
                self.address, creds, options=[("grpc.ssl_target_name_override", CA_SERVER_NAME)]) as channel:
            stub = ca_pb2_grpc.IstioCertificateServiceStub(channel)  # type: ignore[no-untyped-call]
            response: ca_pb2.IstioCertificateResponse = await stub.CreateCertificate(
                request, metadata=metadata, timeout=10)
            return response


@contextlib.asynccontextmanager
async def running_ca(tmp_path: Path, authority: CertificateAuthority | None = None) -> AsyncIterator[Lab]:
    authority = authority or CertificateAuthority.create("cluster.local")
    tokens = tmp_path / "tokens.json"
    rewrite(tokens, json.dumps(TOKENS))
    pods = tmp_path / "pods.yaml"
    write_pods(pods, PODS)
    server = await CaServer.start(authority, NodeTokenFile(tokens), NodeAuthorizer(PodStateFile(pods)))
    try:
        yield Lab(authority, server, tokens, pods, tmp_path)
    finally:
        await server.stop(grace=None)


class ManualTime:
    """An injected clock and sleep: sleeps wait until the test advances the clock past their deadline, and
    the test can wait for the code under test to reach its next sleep."""

    def __init__(self, start: dt.datetime | None = None) -> None:
        self.now = start or dt.datetime.now(dt.UTC)
        self.sleeps: list[float] = []
        self._requested: asyncio.Queue[float] = asyncio.Queue()
        self._sleepers: list[tuple[dt.datetime, asyncio.Future[None]]] = []

    def clock(self) -> dt.datetime:
        return self.now

    async def sleep(self, seconds: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        sleeper = (self.now + dt.timedelta(seconds=seconds), fut)
        self._sleepers.append(sleeper)
        self.sleeps.append(seconds)
        self._requested.put_nowait(seconds)
        try:
            await fut
        finally:
            self._sleepers.remove(sleeper)

    async def next_sleep(self) -> float:
        """The duration of the next sleep the code under test starts (or has started and not been asked
        about yet). Gives up after 10 s of real time, so that a test that waits wrongly fails, not hangs."""
        async with asyncio.timeout(10):
            return await self._requested.get()

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)
        for deadline, fut in list(self._sleepers):
            if deadline <= self.now and not fut.done():
                fut.set_result(None)


def csr_with_key(key: ec.EllipticCurvePrivateKey | object, identity: SpiffeId) -> bytes:
    """A CSR for ``identity`` signed by any key type (the CA must refuse non-P-256 keys)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(identity))])
    csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
           .add_extension(san, critical=True).sign(key, hashes.SHA256()))  # type: ignore[arg-type]
    return csr.public_bytes(serialization.Encoding.PEM)
