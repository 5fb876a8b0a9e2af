"""The CA in a cluster: TokenReview authentication and the node restriction, against the API-server fake.

The fake serves pods over real list/watch (TLS, and a bearer token the CA must present), and TokenReviews
through tests/fixtures/token_reviews.py. The CA is the real one (gRPC over TLS on 127.0.0.1) with
``TokenReviewAuthenticator`` and ``NodeAuthorizer(KubePodDirectory)``; agents ask through ``CaClient``.

Cluster: agent pods ``ambit-system/ambit-agent-1`` on node-1 and ``ambit-agent-2`` on node-2 (service account
``ambit-agent``); workloads ``shop/web-1`` (sa web) on node-1, ``shop/db-0`` (sa db) on node-2, ``shop/batch``
(sa batch, Succeeded) on node-1.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509

from agent.ca import __main__ as ca_main
from agent.ca.auth import AuthenticationError, NodeAuthorizer
from agent.ca.authority import CertificateAuthority
from agent.ca.kube import KubePodDirectory, ServiceAccountRef, TokenReviewAuthenticator, placement
from agent.ca.service import CaServer
from agent.identity.ca_client import CaClient, CaRequestError
from agent.identity.keys import make_csr, new_key
from agent.kube import Connection, connect
from agent.retry import Backoff
from agent.rpc import StatusCode
from agent.sources.watched import SourceError
from hbone.identity import SpiffeId, TrustBundle, identity_of
from tests.fixtures.eventually import eventually
from tests.fixtures.kube_fake import FakeApiServer, pod
from tests.fixtures.token_reviews import TokenReviews

TD = "cluster.local"
API_CREDENTIAL = "the-ca-service-account-token"
FAST = Backoff(initial=0.02, cap=0.2)


def agent_pod(name: str, node: str, uid: str) -> dict[str, object]:
    obj = pod(name, "ambit-system", node=node, service_account="ambit-agent")
    obj["metadata"]["uid"] = uid
    obj["spec"]["hostNetwork"] = True
    return obj


@dataclass
class Cluster:
    api: FakeApiServer
    reviews: TokenReviews
    connection: Connection
    pods: KubePodDirectory
    authenticator: TokenReviewAuthenticator
    authority: CertificateAuthority
    ca: CaServer
    dir: Path

    def agent_token(self, node: str, *, with_node: bool = True, **kw: object) -> str:
        index = node.rsplit("-", 1)[1]
        return self.reviews.bound("ambit-system", "ambit-agent", pod=f"ambit-agent-{index}",
                                  pod_uid=f"uid-agent-{index}", node=node, with_node=with_node, **kw)  # type: ignore[arg-type]

    async def fetch(self, token: str, namespace: str, sa: str) -> SpiffeId:
        """Ask the CA for ``spiffe://cluster.local/ns/<namespace>/sa/<sa>`` with ``token``; the identity issued."""
        identity = SpiffeId(TD, namespace, sa)
        path = self.dir / f"token-{abs(hash(token))}"
        path.write_text(token + "\n")
        client = CaClient(f"127.0.0.1:{self.ca.port}", self.authority.trust_bundle, path)
        try:
            chain = await client.create_certificate(make_csr(identity, new_key()), identity)
        finally:
            await client.close()
        return identity_of(x509.load_pem_x509_certificate(chain[0]))

    async def refused(self, token: str, namespace: str, sa: str) -> CaRequestError:
        with pytest.raises(CaRequestError) as e:
            await self.fetch(token, namespace, sa)
        return e.value


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    api = FakeApiServer(token=API_CREDENTIAL, tls=True)
    reviews = TokenReviews(api)
    await api.start()
    for obj in (agent_pod("ambit-agent-1", "node-1", "uid-agent-1"),
                agent_pod("ambit-agent-2", "node-2", "uid-agent-2"),
                pod("web-1", "shop", node="node-1", service_account="web", ip="10.1.0.5"),
                pod("db-0", "shop", node="node-2", service_account="db", ip="10.2.0.5"),
                pod("batch", "shop", node="node-1", service_account="batch", phase="Succeeded")):
        api.create(obj)
    connection = await connect(api.write_kubeconfig(tmp_path / "kubeconfig"))
    pods = KubePodDirectory(connection.api, backoff=FAST, sync_timeout=3)
    informer = asyncio.create_task(pods.run())
    authenticator = TokenReviewAuthenticator(connection.api, pods=pods)
    authority = CertificateAuthority.create(TD)
    ca = await CaServer.start(authority, authenticator, NodeAuthorizer(pods))
    try:
        await pods.wait_synced()
        yield Cluster(api, reviews, connection, pods, authenticator, authority, ca, tmp_path)
    finally:
        await ca.stop(grace=None)
        informer.cancel()
        await asyncio.gather(informer, return_exceptions=True)
        await connection.close()
        await api.close()


async def test_agent_token_of_node_1_gets_the_identities_of_node_1s_pods(cluster: Cluster) -> None:
    token = cluster.agent_token("node-1")
    assert await cluster.fetch(token, "shop", "web") == SpiffeId(TD, "shop", "web")
    # The review asked the API server for the CA's audience, with the CA's own credential.
    (review,) = cluster.reviews.requests
    assert review["spec"] == {"token": token, "audiences": ["ambit-ca"]}
    assert any(r.method == "POST" and r.path.endswith("/tokenreviews") for r in cluster.api.requests)


async def test_a_token_of_another_node_is_refused_for_node_1s_pods(cluster: Cluster) -> None:
    token = cluster.agent_token("node-2")
    error = await cluster.refused(token, "shop", "web")
    assert error.code == StatusCode.PERMISSION_DENIED
    assert "node 'node-2' may not obtain spiffe://cluster.local/ns/shop/sa/web" in error.details
    assert await cluster.fetch(token, "shop", "db") == SpiffeId(TD, "shop", "db")  # its own pod's: yes
    # A finished pod of node-1 gives node-1 nothing either.
    error = await cluster.refused(cluster.agent_token("node-1"), "shop", "batch")
    assert error.code == StatusCode.PERMISSION_DENIED


async def test_unknown_and_expired_tokens_are_unauthenticated(cluster: Cluster) -> None:
    error = await cluster.refused("not-a-token-the-api-server-issued", "shop", "web")
    assert error.code == StatusCode.UNAUTHENTICATED
    assert "did not authenticate the token" in error.details and "invalid bearer token" in error.details

    token = cluster.agent_token("node-1")
    assert await cluster.fetch(token, "shop", "web") == SpiffeId(TD, "shop", "web")
    cluster.reviews.expire(token)
    error = await cluster.refused(token, "shop", "web")
    assert error.code == StatusCode.UNAUTHENTICATED
    assert "has expired" in error.details
    assert cluster.reviews.reviews_of(token) == 2  # no cache kept the expired token valid


async def test_a_token_of_another_service_account_is_refused(cluster: Cluster) -> None:
    # web-1's own token, for the CA's audience and bound to its pod on node-1: not a node agent.
    token = cluster.reviews.bound("shop", "web", pod="web-1", node="node-1")
    error = await cluster.refused(token, "shop", "web")
    assert error.code == StatusCode.UNAUTHENTICATED
    assert "system:serviceaccount:shop:web" in error.details
    assert "system:serviceaccount:ambit-system:ambit-agent" in error.details


async def test_an_agent_token_for_another_audience_is_refused(cluster: Cluster) -> None:
    # The agent's default token (audience: the API server) must not pass for a CA token.
    token = cluster.agent_token("node-1", audiences=("https://kubernetes.default.svc.cluster.local",))
    error = await cluster.refused(token, "shop", "web")
    assert error.code == StatusCode.UNAUTHENTICATED
    assert "audiences" in error.details
    # An answer from an authenticator that ignores audiences (authenticated, no status.audiences): refused too.
    token = cluster.agent_token("node-1", audience_unaware=True)
    error = await cluster.refused(token, "shop", "web")
    assert error.code == StatusCode.UNAUTHENTICATED
    assert "not for audience 'ambit-ca'" in error.details


async def test_without_the_node_name_extra_the_node_is_the_bound_pods(cluster: Cluster) -> None:
    # Kubernetes before 1.30: bound tokens name the pod only; its spec.nodeName decides.
    token = cluster.agent_token("node-1", with_node=False)
    assert await cluster.fetch(token, "shop", "web") == SpiffeId(TD, "shop", "web")
    assert (await cluster.refused(token, "shop", "db")).code == StatusCode.PERMISSION_DENIED

    # A token of an earlier pod of that name (another uid) is refused, also after a fresh GET.
    stale = cluster.reviews.bound("ambit-system", "ambit-agent", pod="ambit-agent-1", pod_uid="uid-of-a-deleted-pod",
                                  with_node=False)
    error = await cluster.refused(stale, "shop", "web")
    assert error.code == StatusCode.UNAUTHENTICATED
    assert "earlier pod ambit-system/ambit-agent-1" in error.details

    # The bound pod is gone from the API (the token outlived it): refused.
    gone = cluster.reviews.bound("ambit-system", "ambit-agent", pod="ambit-agent-9", with_node=False)
    error = await cluster.refused(gone, "shop", "web")
    assert error.code == StatusCode.UNAUTHENTICATED
    assert "does not exist" in error.details


async def test_a_token_bound_to_no_pod_names_no_node(cluster: Cluster) -> None:
    token = cluster.reviews.bound("ambit-system", "ambit-agent", pod=None)
    error = await cluster.refused(token, "shop", "web")
    assert error.code == StatusCode.UNAUTHENTICATED
    assert "bound to no pod" in error.details


async def test_configured_agent_service_account(cluster: Cluster) -> None:
    other = TokenReviewAuthenticator(cluster.connection.api, agent=ServiceAccountRef.parse("mesh/node-agent"))
    token = cluster.reviews.bound("mesh", "node-agent", pod="node-agent-x", node="node-1")
    caller = await other.authenticate(token)
    assert caller.node_name == "node-1"
    assert caller.subject == "system:serviceaccount:mesh:node-agent pod mesh/node-agent-x"
    with pytest.raises(AuthenticationError, match="ambit-system:ambit-agent"):
        await other.authenticate(cluster.agent_token("node-1"))
    with pytest.raises(ValueError):
        ServiceAccountRef.parse("no-namespace")


async def test_pods_follow_the_api_server(cluster: Cluster) -> None:
    token = cluster.agent_token("node-1")
    assert (await cluster.refused(token, "shop", "cart")).code == StatusCode.PERMISSION_DENIED
    cluster.api.create(pod("cart-1", "shop", node="node-1", service_account="cart", ip="10.1.0.9"))
    await eventually(lambda: ("shop", "cart") in cluster.pods._by_node.get("node-1", {}).values(), "cart-1 seen")
    assert await cluster.fetch(token, "shop", "cart") == SpiffeId(TD, "shop", "cart")

    done = pod("cart-1", "shop", node="node-1", service_account="cart", ip="10.1.0.9", phase="Succeeded")
    cluster.api.update(done)
    await eventually(lambda: ("shop", "cart") not in cluster.pods._by_node.get("node-1", {}).values(), "cart-1 done")
    assert (await cluster.refused(token, "shop", "cart")).code == StatusCode.PERMISSION_DENIED

    cluster.api.delete("Pod", "web-1", "shop")
    await eventually(lambda: "shop/web-1" not in cluster.pods.informer.cache, "web-1 deleted")
    assert (await cluster.refused(token, "shop", "web")).code == StatusCode.PERMISSION_DENIED
    assert await cluster.pods.service_accounts_on_node("node-1") == {("ambit-system", "ambit-agent")}


async def test_concurrent_requests_with_one_token_share_one_review(cluster: Cluster) -> None:
    token = cluster.agent_token("node-1")
    callers = await asyncio.gather(*(cluster.authenticator.authenticate(token) for _ in range(20)))
    assert {c.node_name for c in callers} == {"node-1"}
    assert cluster.reviews.reviews_of(token) == 1
    await cluster.authenticator.authenticate(token)  # once done, the next request is reviewed again
    assert cluster.reviews.reviews_of(token) == 2


async def test_an_api_server_that_cannot_answer_gives_unavailable(cluster: Cluster,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    token = cluster.agent_token("node-1")
    await cluster.api.close()  # connection refused: not a verdict on the token
    with caplog.at_level(logging.WARNING, "ambit.ca.kube"):
        error = await cluster.refused(token, "shop", "web")
    assert error.code == StatusCode.UNAVAILABLE
    assert "unreachable" in caplog.text


async def test_a_forbidden_token_review_gives_unavailable_and_names_rbac(tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    async with FakeApiServer(token="wrong") as api:  # the CA's credential is refused: 401, not a token verdict
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
        api.token = "right"
        connection = await connect(kubeconfig)
        try:
            with caplog.at_level(logging.ERROR, "ambit.ca.kube"), pytest.raises(SourceError):
                await TokenReviewAuthenticator(connection.api).authenticate("some-token")
            assert "answered 401" in caplog.text
        finally:
            await connection.close()


def test_placement_of_pods() -> None:
    assert placement(pod("a", "ns", node="n1", service_account="sa")) == ("n1", ("ns", "sa"))
    unscheduled = pod("a", "ns", service_account="sa")
    del unscheduled["spec"]["nodeName"]
    assert placement(unscheduled) is None
    assert placement(pod("a", "ns", node="n1", phase="Failed")) is None
    legacy = pod("a", "ns", node="n1")
    legacy["spec"] = {"nodeName": "n1", "serviceAccount": "old"}
    assert placement(legacy) == ("n1", ("ns", "old"))


# -- the command line ------------------------------------------------------------------------------------------
def test_command_line_modes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ca_main.parse_args(["--dir", str(tmp_path), "--kubernetes", "--agent-service-account", "mesh/agent"])
    assert args.kubernetes and args.agent_service_account == ServiceAccountRef("mesh", "agent")
    assert args.token_audience == "ambit-ca"
    for bad in (["--kubernetes", "--tokens", "t", "--pods", "p"], ["--tokens", "t"],
                ["--kubernetes", "--agent-service-account", "nope"]):
        with pytest.raises(SystemExit):
            ca_main.parse_args(["--dir", str(tmp_path), *bad])

    ca_main.main(["--dir", str(tmp_path / "root"), "--trust-domain", "example.org", "--init"])
    first = (tmp_path / "root" / "root-cert.pem").read_bytes()
    ca_main.main(["--dir", str(tmp_path / "root"), "--trust-domain", "example.org", "--init"])
    assert (tmp_path / "root" / "root-cert.pem").read_bytes() == first  # kept, not replaced
    out = capsys.readouterr().out
    assert "created a root for example.org" in out and "kept the root for example.org" in out
    assert oct((tmp_path / "root" / "root-key.pem").stat().st_mode & 0o777) == "0o600"


async def test_python_m_agent_ca_kubernetes_serves_agents(tmp_path: Path) -> None:
    """The CA as the Deployment runs it (``--kubernetes``), against the fake through a kubeconfig."""
    api = FakeApiServer(token=API_CREDENTIAL, tls=True)
    reviews = TokenReviews(api)
    async with api:
        api.create(pod("web-1", "shop", node="node-1", service_account="web", ip="10.1.0.5"))
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
        ca_dir = tmp_path / "ca"
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent.ca", "--dir", str(ca_dir), "--listen", "127.0.0.1:0", "--kubernetes",
            "--kubeconfig", str(kubeconfig), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        try:
            assert proc.stdout is not None
            output = b""
            async with asyncio.timeout(20):
                while b"ambit-ca: serving" not in output:
                    line = await proc.stdout.readline()
                    assert line, f"the CA exited: {output.decode()}"
                    output += line
            match = re.search(rb"on port (\d+)", output)
            assert match is not None
            bundle = TrustBundle(TD, (ca_dir / "root-cert.pem").read_bytes())
            token_file = tmp_path / "token"
            token_file.write_text(reviews.bound("ambit-system", "ambit-agent", pod="ambit-agent-1", node="node-1"))
            client = CaClient(f"127.0.0.1:{int(match.group(1))}", bundle, token_file)
            try:
                identity = SpiffeId(TD, "shop", "web")
                chain = await client.create_certificate(make_csr(identity, new_key()), identity)
                assert identity_of(x509.load_pem_x509_certificate(chain[0])) == identity
                token_file.write_text("unknown")
                with pytest.raises(CaRequestError) as e:
                    await client.create_certificate(make_csr(identity, new_key()), identity)
                assert e.value.code == StatusCode.UNAUTHENTICATED
            finally:
                await client.close()
        finally:
            proc.terminate()
            async with asyncio.timeout(10):
                await proc.wait()
