"""Run Ambit's CA.

    python -m agent.ca --dir DIR --trust-domain TD --listen HOST:PORT --tokens FILE --pods FILE

DIR keeps the root key (root-key.pem, mode 0600) and the root certificate; node agents need only
DIR/root-cert.pem, their trust bundle. --tokens maps bearer tokens to node names (YAML or JSON);
--pods holds the Pod objects (a List or several YAML documents) that decide which node may obtain which
identity. Both files are re-read when they change.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from pathlib import Path

from agent.ca.auth import NodeAuthorizer, NodeTokenFile, PodStateFile
from agent.ca.authority import ROOT_CERT_FILE, CertificateAuthority
from agent.ca.client import CA_SERVER_NAME
from agent.ca.service import CaServer

log = logging.getLogger("ambit.ca")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m agent.ca", description="Ambit's certificate authority")
    p.add_argument("--dir", type=Path, required=True, help="directory of the root key and certificate")
    p.add_argument("--trust-domain", default="cluster.local")
    p.add_argument("--listen", default="127.0.0.1:15012", help="HOST:PORT to serve gRPC on")
    p.add_argument("--tokens", type=Path, required=True, help="token -> node name file (YAML or JSON)")
    p.add_argument("--pods", type=Path, required=True, help="YAML file of Pod objects")
    p.add_argument("--dns-name", action="append", default=[], metavar="NAME",
                   help=f"extra DNS name for the CA's serving certificate (always has {CA_SERVER_NAME})")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    authority = CertificateAuthority.load_or_create(args.dir, args.trust_domain)
    log.info("root %s (valid until %s) in %s", authority.root_cert.subject.rfc4514_string(),
             authority.root_cert.not_valid_after_utc.isoformat(), args.dir / ROOT_CERT_FILE)
    server = await CaServer.start(authority, NodeTokenFile(args.tokens), NodeAuthorizer(PodStateFile(args.pods)),
                                  args.listen, dns_names=[CA_SERVER_NAME, *args.dns_name])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"ambit-ca: serving {args.trust_domain} on port {server.port}; "
          f"trust bundle {args.dir / ROOT_CERT_FILE}", flush=True)
    await stop.wait()
    log.info("stopping")
    await server.stop(grace=5.0)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args))


if __name__ == "__main__":
    main()
