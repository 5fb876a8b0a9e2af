"""``make demo`` (until the lab exists): two node agents exchange traffic over HBONE on loopback.

Everything is real: Ambit's CA serves gRPC over TLS; each agent authenticates with its node token and
gets certificates only for workloads on its node; node-a's agent tunnels an app's connection to node-b's
HBONE server with mutual TLS, each side verifying the other's SPIFFE identity. The script prints what
happened at every step, then shows a policy denial and an identity mismatch.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import os
import sys
import tempfile
from pathlib import Path

import uvloop
import yaml

from agent.ca.auth import NodeAuthorizer, NodeTokenFile, PodStateFile
from agent.ca.authority import CertificateAuthority
from agent.ca.client import CaClient, CaRequestError
from agent.ca.manager import CertificateManager, CertificateUnavailable
from agent.ca.service import CaServer
from hbone.forward import Forwarder
from hbone.identity import SpiffeId, WorkloadCertificate
from hbone.memory import keep_buffers_on_heap
from hbone.pool import Pool
from hbone.protocol import Authority
from hbone.server import HboneServer, InboundRequest

TD = "cluster.local"
CLIENT = SpiffeId(TD, "demo", "client")
SERVER = SpiffeId(TD, "demo", "server")


def say(step: str, text: str) -> None:
    print(f"[{step:>7}] {text}", flush=True)


def _pod(name: str, node: str, sa: str) -> dict[str, object]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "demo"},
            "spec": {"nodeName": node, "serviceAccountName": sa}, "status": {"phase": "Running"}}


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(1 << 20):
        writer.write(data)
        await writer.drain()
    writer.write_eof()
    writer.close()


async def _exchange(entry: tuple[str, int], payload: bytes) -> bytes | str:
    reader, writer = await asyncio.open_connection(*entry)
    writer.write(payload)
    writer.write_eof()
    try:
        return await asyncio.wait_for(reader.read(-1), 10)
    except ConnectionResetError:
        return "connection reset"
    finally:
        writer.close()


async def main(workdir: Path) -> int:
    authority = CertificateAuthority.create(TD)
    (workdir / "tokens.yaml").write_text(yaml.safe_dump({"token-a": "node-a", "token-b": "node-b"}))
    pods = [_pod("client-1", "node-a", "client"), _pod("server-1", "node-b", "server")]
    (workdir / "pods.yaml").write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": pods}))
    ca = await CaServer.start(authority, NodeTokenFile(workdir / "tokens.yaml"),
                              NodeAuthorizer(PodStateFile(workdir / "pods.yaml")))
    ca_addr = f"127.0.0.1:{ca.port}"
    say("ca", f"Ambit CA for {TD!r} serving IstioCertificateService on {ca_addr} (gRPC over TLS)")
    say("ca", "pods: demo/client-1 (sa client) on node-a, demo/server-1 (sa server) on node-b")

    bundle = authority.trust_bundle
    managers = {node: CertificateManager(CaClient(ca_addr, bundle, functools.partial(str, token)), bundle)
                for node, token in (("node-a", "token-a"), ("node-b", "token-b"))}
    try:
        return await _identities_then_tunnels(managers)
    finally:
        for manager in managers.values():
            await manager.close()
        await ca.stop(grace=0)


async def _identities_then_tunnels(managers: dict[str, CertificateManager]) -> int:
    certs: dict[str, WorkloadCertificate] = {}
    for node, identity in (("node-a", CLIENT), ("node-b", SERVER)):
        cert = await managers[node].get(identity)
        certs[node] = cert
        say(node, f"certificate for {cert.identity}, valid until {cert.not_after:%Y-%m-%d %H:%M} UTC, "
                  f"renews at {cert.refresh_at:%H:%M}")
    try:
        await managers["node-a"].get(SERVER)
    except (CertificateUnavailable, CaRequestError) as e:
        say("node-a", f"asking for {SERVER} (a pod of node-b) is refused: {e}")
    managers["node-a"].forget(SERVER)

    seen: list[InboundRequest] = []
    deny: set[SpiffeId] = set()

    def policy(request: InboundRequest) -> str | None:
        seen.append(request)
        return f"demo policy denies {request.peer}" if request.peer in deny else None

    upstream = await asyncio.start_server(_echo, "127.0.0.1", 0)
    up = upstream.sockets[0].getsockname()[:2]

    async def server_certificate(_ip: str) -> WorkloadCertificate:
        return await managers["node-b"].get(SERVER)

    hbone = HboneServer(server_certificate, lambda: managers["node-b"].trust_bundle, policy=policy)
    await hbone.start("127.0.0.1", 0)
    say("node-b", f"HBONE server on {hbone.address[0]}:{hbone.address[1]} (15008 in a cluster); "
                  f"app 'server' echoes on {up[0]}:{up[1]}")
    pool = Pool(lambda: managers["node-a"].trust_bundle)

    async def forwarder(expect: SpiffeId) -> tuple[Forwarder, tuple[str, int]]:
        fwd = Forwarder(pool, certs["node-a"], expect, hbone.address, Authority(*up))
        return fwd, await fwd.start()

    fwd, entry = await forwarder(SERVER)
    payload = os.urandom(4 << 20)
    say("node-a", f"app 'client' sends 4 MiB to {up[0]}:{up[1]} through node-a's agent")
    back = await _exchange(entry, payload)
    ok = isinstance(back, bytes) and hashlib.sha256(back).digest() == hashlib.sha256(payload).digest()
    request = seen[-1]
    say("node-b", f"CONNECT {request.target} from {request.peer} (mutual TLS, peer verified)")
    say("node-b", f"headers: forwarded: {request.headers.get('forwarded')}; "
                  f"traceparent: {request.headers.get('traceparent')}")
    say("node-a", f"echo came back byte-exact: {ok} ({len(back) if isinstance(back, bytes) else back} bytes); "
                  f"one pooled HBONE connection: {pool.connections() == 1}")

    deny.add(CLIENT)
    denied = await _exchange(entry, b"hello")
    say("policy", f"with a policy denying {CLIENT}: server answered 401 "
                  f"({hbone.stats['denied']} denied), client saw: {denied!r}")
    deny.clear()

    wrong, wrong_entry = await forwarder(SpiffeId(TD, "demo", "impostor"))
    result = await _exchange(wrong_entry, b"hello")
    say("node-a", f"expecting {SpiffeId(TD, 'demo', 'impostor')} at node-b: refused before any byte was sent "
                  f"(client saw {result!r})")

    for closing in (wrong, fwd):
        await closing.close()
    await pool.close()
    await hbone.close()
    upstream.close()
    passed = ok and denied == "connection reset" and result == "connection reset"
    say("demo", "all steps behaved as expected" if passed else "SOMETHING WENT WRONG (see above)")
    return 0 if passed else 1


def run() -> int:
    logging.basicConfig(level=logging.WARNING, format="          (log) %(name)s: %(message)s")
    keep_buffers_on_heap()
    with tempfile.TemporaryDirectory(prefix="ambit-demo-") as tmp:
        return uvloop.run(main(Path(tmp)))


if __name__ == "__main__":
    sys.exit(run())
