"""Run Ambit's CA.

    python -m agent.ca --dir DIR --trust-domain TD --listen HOST:PORT --tokens FILE --pods FILE
    python -m agent.ca --dir DIR --trust-domain TD --listen HOST:PORT --kubernetes [--kubeconfig FILE [--context C]]
    python -m agent.ca --dir DIR --trust-domain TD --init
    python -m agent.ca --dir DIR --trust-domain TD --issue intermediate|observer|operator --out OUT [--days N]

DIR keeps the CA's key (mode 0600, in a directory made 0700; an existing DIR open to other users is refused)
and certificates: a self-signed root (root-key.pem, root-cert.pem), or, with the root kept offline, an
intermediate in Istio's plug-in layout (ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem; see
agent/ca/authority.py). Node agents need only DIR/root-cert.pem, their trust bundle. With --init a root is
created in DIR (unless a CA is there) and the command exits: how a deployment makes the root it then hands to
the CA (a Secret) and to the agents. --issue writes a certificate for one of Ambit's own parts into OUT
(agent/ca/issue.py): an intermediate CA for a cluster, the agents' Observer server, an operator.

Lab mode: --tokens maps bearer tokens to node names (YAML or JSON); --pods holds the Pod objects (a List or
several YAML documents) that decide which node may obtain which identity. Both files are re-read when they
change.

Kubernetes mode (--kubernetes; in-cluster config, or --kubeconfig): a bearer token is a node agent's projected
ServiceAccount token, checked with a TokenReview for --token-audience and accepted only for
--agent-service-account; the pods come from a Pod informer (agent/ca/kube.py). The CA listens only once the
pods are listed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import logging
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

from agent.ca.auth import Authenticator, NodeAuthorizer, NodeTokenFile, PodDirectory, PodStateFile
from agent.ca.authority import CA_CERT_FILE, ROOT_CERT_FILE, CaMaterialError, CertificateAuthority
from agent.ca.files import KeyDirectoryError
from agent.ca.issue import KINDS, default_ttl, issue
from agent.ca.kube import (
    AGENT_SERVICE_ACCOUNT,
    CA_AUDIENCE,
    KubePodDirectory,
    ServiceAccountRef,
    TokenReviewAuthenticator,
)
from agent.ca.service import CaServer
from agent.identity.ca_client import CA_SERVER_NAME
from agent.kube.client import KubeConfigError, connect

log = logging.getLogger("ambit.ca")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m agent.ca", description="Ambit's certificate authority")
    p.add_argument("--dir", type=Path, required=True, help="directory of the root key and certificate")
    p.add_argument("--trust-domain", default="cluster.local")
    p.add_argument("--listen", default="127.0.0.1:15012", help="HOST:PORT to serve gRPC on")
    p.add_argument("--init", action="store_true", help="create the root in --dir (unless there is one) and exit")
    p.add_argument("--issue", choices=KINDS, help="write a certificate of this kind into --out and exit")
    p.add_argument("--out", type=Path, help="with --issue: the directory to write (made 0700)")
    p.add_argument("--days", type=float, help="with --issue: validity in days (default: intermediate "
                   f"{default_ttl('intermediate').days}, others {default_ttl('observer').days}, the most allowed)")
    p.add_argument("--tokens", type=Path, help="lab: token -> node name file (YAML or JSON)")
    p.add_argument("--pods", type=Path, help="lab: YAML file of Pod objects")
    p.add_argument("--kubernetes", action="store_true",
                   help="authenticate node agents with TokenReview and watch pods through the Kubernetes API")
    p.add_argument("--kubeconfig", type=Path, default=None, help="with --kubernetes: a kubeconfig file "
                   "(default: in-cluster config, else $KUBECONFIG or ~/.kube/config)")
    p.add_argument("--context", default=None,
                   help="with --kubernetes and a kubeconfig: the context to use (default: its current-context)")
    p.add_argument("--agent-service-account", default=str(AGENT_SERVICE_ACCOUNT), metavar="NAMESPACE/NAME",
                   help=f"with --kubernetes: the node agents' service account (default {AGENT_SERVICE_ACCOUNT})")
    p.add_argument("--token-audience", default=CA_AUDIENCE,
                   help=f"with --kubernetes: the audience of the agents' tokens (default {CA_AUDIENCE})")
    p.add_argument("--dns-name", action="append", default=[], metavar="NAME",
                   help=f"extra DNS name for the CA's serving certificate (always has {CA_SERVER_NAME})")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    if args.init and args.issue:
        p.error("--init and --issue are separate steps")
    if args.issue:
        if args.out is None:
            p.error("--issue needs --out DIR")
        if args.days is not None and args.days <= 0:
            p.error("--days must be positive")
        return args
    if args.out or args.days:
        p.error("--out and --days go with --issue")
    if args.init:
        return args
    if args.kubernetes:
        if args.tokens or args.pods:
            p.error("--tokens and --pods are the lab's; --kubernetes replaces them")
        try:
            args.agent_service_account = ServiceAccountRef.parse(args.agent_service_account)
        except ValueError as e:
            p.error(f"--agent-service-account: {e}")
    elif not (args.tokens and args.pods):
        p.error("--tokens and --pods are required (or --kubernetes)")
    return args


async def _kubernetes(args: argparse.Namespace,
                      cleanup: list[Callable[[], Awaitable[None]]]) -> tuple[Authenticator, PodDirectory]:
    try:
        connection = await connect(args.kubeconfig, context=args.context)
    except KubeConfigError as e:
        raise SystemExit(f"ambit-ca: {e}") from None
    cleanup.append(connection.close)
    pods = KubePodDirectory(connection.api)
    informer = asyncio.create_task(pods.run(), name="pod informer")

    async def stop_informer() -> None:
        informer.cancel()
        await asyncio.gather(informer, return_exceptions=True)

    cleanup.append(stop_informer)
    while not pods.synced.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(pods.synced.wait(), 30)
        if not pods.synced.is_set():
            log.warning("still waiting for the first list of pods from the Kubernetes API (%s)", connection.origin)
    log.info("%d pods listed; node agents authenticate as %s with audience %r", len(pods.informer.cache),
             args.agent_service_account, args.token_audience)
    authenticator = TokenReviewAuthenticator(connection.api, agent=args.agent_service_account,
                                             audience=args.token_audience, pods=pods)
    return authenticator, pods


def describe(authority: CertificateAuthority) -> str:
    what = "root" if authority.intermediate is None else "intermediate CA (its root offline)"
    return f"{what} for {authority.trust_domain}"


def valid_until(authority: CertificateAuthority) -> str:
    return authority.signer.not_valid_after_utc.date().isoformat()


async def serve(args: argparse.Namespace) -> None:
    authority = CertificateAuthority.load_or_create(args.dir, args.trust_domain)
    log.info("signing with the %s %r (valid until %s); trust bundle %s", describe(authority),
             authority.signer.subject.rfc4514_string(), valid_until(authority), args.dir / ROOT_CERT_FILE)
    cleanup: list[Callable[[], Awaitable[None]]] = []
    try:
        authenticator: Authenticator
        pods: PodDirectory
        if args.kubernetes:
            authenticator, pods = await _kubernetes(args, cleanup)
        else:
            authenticator, pods = NodeTokenFile(args.tokens), PodStateFile(args.pods)
        server = await CaServer.start(authority, authenticator, NodeAuthorizer(pods), args.listen,
                                      dns_names=[CA_SERVER_NAME, *args.dns_name])
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        print(f"ambit-ca: serving {args.trust_domain} on port {server.port}; "
              f"trust bundle {args.dir / ROOT_CERT_FILE}", flush=True)
        await stop.wait()
        log.info("stopping")
        await server.stop(grace=5.0)
    finally:
        for step in reversed(cleanup):
            await step()


def init(args: argparse.Namespace) -> None:
    existed = (args.dir / ROOT_CERT_FILE).exists() or (args.dir / CA_CERT_FILE).exists()
    authority = CertificateAuthority.load_or_create(args.dir, args.trust_domain)
    print(f"ambit-ca: {'kept the' if existed else 'created a'} {describe(authority)} in {args.dir} "
          f"(valid until {valid_until(authority)})", flush=True)


def issue_command(args: argparse.Namespace) -> None:
    if not ((args.dir / ROOT_CERT_FILE).exists() or (args.dir / CA_CERT_FILE).exists()):
        raise CaMaterialError(f"no CA in {args.dir}: make one with --init, or name the CA's directory with --dir")
    authority = CertificateAuthority.load(args.dir, args.trust_domain)
    ttl = dt.timedelta(days=args.days) if args.days is not None else None
    print(f"ambit-ca: {issue(authority, args.issue, args.out, ttl)}", flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.init:
            init(args)
        elif args.issue:
            issue_command(args)
        else:
            with contextlib.suppress(KeyboardInterrupt):
                asyncio.run(serve(args))
    except (CaMaterialError, KeyDirectoryError) as e:
        raise SystemExit(f"ambit-ca: {e}") from None


if __name__ == "__main__":
    main()
