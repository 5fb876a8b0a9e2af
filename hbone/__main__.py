"""``python -m hbone``: a standalone HBONE server or forwarder (for benchmarks, interop tests, the demo).

    python -m hbone serve   --listen H:P --cert C --key K --bundle B --trust-domain TD
    python -m hbone forward --listen H:P --hbone H:P --authority IP:PORT --expect SPIFFE_ID
                            --cert C --key K --bundle B --trust-domain TD
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

import uvloop

from hbone.authority import Authority
from hbone.forward import Forwarder
from hbone.identity import SpiffeId, TrustBundle, WorkloadCertificate
from hbone.memory import keep_buffers_on_heap
from hbone.pool import Pool
from hbone.server import HboneServer, fixed_certificate

log = logging.getLogger("hbone")


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def _identity(args: argparse.Namespace) -> tuple[WorkloadCertificate, TrustBundle]:
    cert = WorkloadCertificate.from_pem(Path(args.cert).read_bytes(), Path(args.key).read_bytes())
    return cert, TrustBundle(args.trust_domain, Path(args.bundle).read_bytes())


async def _serve(args: argparse.Namespace) -> None:
    cert, bundle = _identity(args)
    host, port = _hostport(args.listen)
    server = HboneServer(fixed_certificate(cert), bundle)
    await server.start(host, port)
    print(f"listening on {server.address[0]}:{server.address[1]}", flush=True)
    await _until_signal()
    await server.close()


async def _forward(args: argparse.Namespace) -> None:
    cert, bundle = _identity(args)
    pool = Pool(bundle)
    forwarder = Forwarder(pool, cert, SpiffeId.parse(args.expect), _hostport(args.hbone),
                          Authority.parse(args.authority))
    host, port = await forwarder.start(*_hostport(args.listen))
    print(f"listening on {host}:{port}", flush=True)
    await _until_signal()
    await forwarder.close()
    await pool.close()


async def _until_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hbone", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("serve", "forward"):
        p = sub.add_parser(name)
        p.add_argument("--listen", required=True)
        p.add_argument("--cert", required=True)
        p.add_argument("--key", required=True)
        p.add_argument("--bundle", required=True)
        p.add_argument("--trust-domain", required=True)
        p.add_argument("-v", "--verbose", action="store_true")
        if name == "forward":
            p.add_argument("--hbone", required=True, help="HBONE server address")
            p.add_argument("--authority", required=True, help="CONNECT target ip:port")
            p.add_argument("--expect", required=True, help="SPIFFE ID the server must present")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    keep_buffers_on_heap()
    uvloop.run(_serve(args) if args.command == "serve" else _forward(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
