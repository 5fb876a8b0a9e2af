"""``python -m hbone``: a standalone HBONE server or forwarder (for benchmarks, interop tests, the demo).

    python -m hbone serve   --listen H:P --cert C --key K --bundle B --trust-domain TD [--any-target]
    python -m hbone forward --listen H:P --hbone H:P --authority IP:PORT|[IPV6]:PORT --expect SPIFFE_ID
                            --cert C --key K --bundle B --trust-domain TD
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import uvloop

from hbone.addresses import format_address, parse_host_port
from hbone.authority import Authority
from hbone.forward import Forwarder
from hbone.identity import SpiffeId, TrustBundle, WorkloadCertificate
from hbone.memory import keep_buffers_on_heap
from hbone.pool import Pool
from hbone.profiling import profile_on_signals
from hbone.server import HboneServer, fixed_certificate

log = logging.getLogger("hbone")
T = TypeVar("T")


def _identity(args: argparse.Namespace) -> tuple[WorkloadCertificate, TrustBundle]:
    cert = WorkloadCertificate.from_pem(Path(args.cert).read_bytes(), Path(args.key).read_bytes())
    return cert, TrustBundle(args.trust_domain, Path(args.bundle).read_bytes())


async def _serve(args: argparse.Namespace) -> None:
    cert, bundle = _identity(args)
    server = HboneServer(fixed_certificate(cert), bundle, check_authority_ip=not args.any_target)
    await server.start(*args.listen)
    print(f"listening on {format_address(*server.address)}", flush=True)
    await _until_signal()
    await server.close()


async def _forward(args: argparse.Namespace) -> None:
    cert, bundle = _identity(args)
    pool = Pool(bundle)
    forwarder = Forwarder(pool, cert, SpiffeId.parse(args.expect), args.hbone, args.authority)
    address = await forwarder.start(*args.listen)
    print(f"listening on {format_address(*address)}", flush=True)
    await _until_signal()
    await forwarder.close()
    await pool.close()


async def _until_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    profile_on_signals(loop, "hbone")  # (only when AMBIT_CPROFILE asks: the benchmarks)
    await stop.wait()


def _typed(parse: Callable[[str], T]) -> Callable[[str], T]:
    """An argparse type from a parser raising ValueError with its own message (argparse would hide it)."""
    def convert(text: str) -> T:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return convert


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hbone", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("serve", "forward"):
        p = sub.add_parser(name)
        p.add_argument("--listen", required=True, metavar="HOST:PORT",
                       type=_typed(lambda t: parse_host_port(t, "--listen", listen=True)))
        p.add_argument("--cert", required=True)
        p.add_argument("--key", required=True)
        p.add_argument("--bundle", required=True)
        p.add_argument("--trust-domain", required=True)
        p.add_argument("-v", "--verbose", action="store_true")
        if name == "serve":
            p.add_argument("--any-target", action="store_true",
                           help="relay to any CONNECT target: without it, as ztunnel, only to this connection's "
                                "destination address (the server stands for the workload it runs beside)")
        if name == "forward":
            p.add_argument("--hbone", required=True, help="HBONE server address", metavar="HOST:PORT",
                           type=_typed(lambda t: parse_host_port(t, "--hbone")))
            p.add_argument("--authority", required=True, help="CONNECT target ip:port or [ipv6]:port",
                           type=_typed(Authority.parse))
            p.add_argument("--expect", required=True, help="SPIFFE ID the server must present")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    keep_buffers_on_heap()
    uvloop.run(_serve(args) if args.command == "serve" else _forward(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
