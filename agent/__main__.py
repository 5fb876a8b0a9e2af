"""``python -m agent run``: the node agent (what the DaemonSet runs on every node, and the lab per node).

It prints a line with ``ambit-agent ready`` once its eBPF programs are attached and its listeners are
up; SIGTERM or SIGINT stop it (the programs stay attached unless --release-on-exit: fail closed).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import resource
import signal
import sys
from pathlib import Path

import uvloop

from agent.node import AgentConfig, NodeAgent
from agent.telemetry.hub import TelemetryConfig
from agent.telemetry.observer_tls import ServerTlsFiles, TlsMaterialError, read_cas, read_key_pair
from hbone import keep_buffers_on_heap, parse_host_port
from hbone.profiling import profile_on_signals


def _address(text: str) -> tuple[str, int] | None:
    """A listening address, HOST:PORT or [IPV6]:PORT (port 0: any); "" for none."""
    if not text:
        return None
    try:
        return parse_host_port(text, listen=True)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _columns() -> int:
    """The terminal's width as ``shutil.get_terminal_size`` finds it: $COLUMNS, else standard output's terminal,
    else 80."""
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns if sys.__stdout__ else 0
        except (ValueError, OSError):
            columns = 0
    return columns if columns > 0 else 80


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's formatter, told the width: left to find it, argparse imports shutil, and shutil brings bz2 and
    lzma (0.4 MiB) into the long-lived agent for this one call (every ``add_argument`` makes a formatter)."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=_columns() - 2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m agent", description=__doc__, formatter_class=_HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the node agent", formatter_class=_HelpFormatter)
    run.add_argument("--node", required=True, help="this node's name")
    cluster = run.add_mutually_exclusive_group(required=True)
    cluster.add_argument("--state", type=Path, help="the lab's cluster state file (Kubernetes objects)")
    cluster.add_argument("--kubernetes", action="store_true",
                         help="watch the Kubernetes API (in-cluster config, or --kubeconfig)")
    run.add_argument("--kubeconfig", type=Path, default=None, help="with --kubernetes: a kubeconfig file")
    run.add_argument("--context", default=None,
                     help="with --kubernetes and a kubeconfig: the context to use (default: its current-context)")
    run.add_argument("--ca", required=True, help="CA address host:port")
    run.add_argument("--ca-token", type=Path, required=True, help="file with this node's bearer token")
    run.add_argument("--trust-bundle", type=Path, required=True, help="PEM file of the trusted roots")
    run.add_argument("--trust-domain", default="cluster.local")
    run.add_argument("--uplink", action="append", default=None, help="node uplink interface (repeatable)")
    run.add_argument("--fail-open", action="store_true",
                     help="when the agent is down, let enrolled pods' traffic go direct (default: fail closed)")
    run.add_argument("--node-traffic", choices=("probes", "all"), default="probes",
                     help="connections the node itself (kubelet, hostNetwork pods) opens to enrolled pods: 'probes' "
                          "lets only those to the ports the pod's own liveness/readiness/startup probes name pass "
                          "uncaptured and judges every other as plaintext from an unknown source; 'all' lets every "
                          "one pass, as Istio does (default %(default)s)")
    run.add_argument("--proc-sys", default="/proc/sys", metavar="DIR",
                     help="the node's /proc/sys, where the agent sets what the capture needs "
                          "(net.ipv4.tcp_early_demux and tcp_tw_reuse, per-veth accept_local and rp_filter); the "
                          "DaemonSet mounts the "
                          "host's /proc/sys/net under DIR, as a container's own is read-only (default %(default)s)")
    run.add_argument("--release-on-exit", action="store_true", help="detach everything when stopping")
    run.add_argument("--bpffs", default="/sys/fs/bpf", metavar="DIR",
                     help="tcx links are pinned in DIR/ambit/<node>; DIR/ambit may be a bpffs mount of its own "
                          "(the DaemonSet mounts only the host's /sys/fs/bpf/ambit) (default %(default)s)")
    run.add_argument("--daemonset", default=None, metavar="NAMESPACE/NAME",
                     help="with --kubernetes: the agent's DaemonSet; when it is gone or being deleted at shutdown, "
                          "Ambit is being uninstalled and the agent detaches everything (else: an upgrade, the "
                          "node stays fail-closed for the next agent)")
    run.add_argument("--drain-seconds", type=float, default=0.0,
                     help="on SIGTERM, accept no new connections and let open ones finish for this long")
    run.add_argument("--flows", type=int, default=4096, help="flows kept for the Observer API")
    run.add_argument("--no-telemetry", action="store_true",
                     help="record no flows or traffic metrics (to measure what observability costs)")
    run.add_argument("--observer-socket", default=None, help="unix socket of the Observer API")
    run.add_argument("--observer-listen", default=None, metavar="HOST:PORT",
                     help="also serve the Observer API on TCP, with mutual TLS only (needs the three files below)")
    run.add_argument("--observer-tls-cert-file", type=Path, metavar="FILE",
                     help="the Observer's server certificate (chain), e.g. from `ambit ca --issue observer`")
    run.add_argument("--observer-tls-key-file", type=Path, metavar="FILE", help="its private key")
    run.add_argument("--observer-tls-client-ca-files", type=Path, action="append", metavar="FILE",
                     help="CA certificates a client's certificate must chain to (repeatable; the trust bundle)")
    run.add_argument("--admin-socket", default=None, help="unix socket serving /config_dump, /metrics, readiness")
    run.add_argument("--admin-listen", default="127.0.0.1:15000", type=_address, metavar="HOST:PORT",
                     help="TCP address of /config_dump and /logging ('' for none: the admin socket only) "
                          "(default %(default)s)")
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    if args.command == "run":
        args.observer_tls = _observer_tls(run, args)
    return args


def _observer_tls(run: argparse.ArgumentParser, args: argparse.Namespace) -> ServerTlsFiles | None:
    """The Observer's TLS files, checked: all three with --observer-listen, none without it."""
    given = {"--observer-tls-cert-file": args.observer_tls_cert_file, "--observer-tls-key-file":
             args.observer_tls_key_file, "--observer-tls-client-ca-files": args.observer_tls_client_ca_files}
    if not args.observer_listen:
        if any(given.values()):
            run.error(f"{', '.join(k for k, v in given.items() if v)} without --observer-listen: no TCP listener "
                      "to use them (the unix socket needs no TLS)")
        return None
    if missing := [k for k, v in given.items() if not v]:
        run.error(f"--observer-listen {args.observer_listen}: the Observer serves TCP over mutual TLS only; "
                  f"missing {', '.join(missing)}")
    files = ServerTlsFiles(args.observer_tls_cert_file, args.observer_tls_key_file,
                           tuple(args.observer_tls_client_ca_files))
    try:
        read_key_pair(files.cert, files.key)
        read_cas(files.client_cas)
    except TlsMaterialError as e:
        run.error(str(e))
    return files


def _daemonset(text: str | None) -> tuple[str, str] | None:
    if text is None:
        return None
    namespace, sep, name = text.partition("/")
    if not sep or not namespace or not name:
        raise SystemExit(f"--daemonset {text!r}: give NAMESPACE/NAME")
    return namespace, name


async def run(args: argparse.Namespace) -> None:
    config = AgentConfig(node=args.node, state=args.state, ca_address=args.ca, ca_token=args.ca_token,
                         trust_bundle=args.trust_bundle, trust_domain=args.trust_domain,
                         uplinks=tuple(args.uplink or ["eth0"]), fail_open=args.fail_open,
                         node_passes=args.node_traffic == "all", proc_sys=args.proc_sys,
                         kubeconfig=args.kubeconfig, kube_context=args.context, bpffs=args.bpffs,
                         daemonset=_daemonset(args.daemonset),
                         telemetry=TelemetryConfig(enabled=not args.no_telemetry, flows=args.flows,
                                                   observer_socket=args.observer_socket,
                                                   observer_listen=args.observer_listen or None,
                                                   observer_tls=args.observer_tls,
                                                   admin_listen=args.admin_listen, admin_socket=args.admin_socket))
    agent = NodeAgent(config)
    await agent.start()
    # What start-up built (the cluster's state, policies, modules) lives on: out of the collector's sight, a
    # full collection costs ~0 instead of 140-210 ms of a stalled event loop at 10,000 pods (bench/store.py).
    gc.freeze()
    print(f"ambit-agent ready on node {config.node}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    profile_on_signals(loop, f"agent-{config.node}")  # (only when AMBIT_CPROFILE asks: the benchmarks)
    await stop.wait()
    if args.drain_seconds > 0:
        await agent.drain(args.drain_seconds)
    release = args.release_on_exit or await agent.uninstalling()
    await agent.close(release=release)


def raise_fd_limit() -> int:
    """Lift the soft open-files limit to the hard one, as Envoy and ztunnel do: every proxied connection
    holds a socket (two on a node that is both ends), and the common soft default of 1024 would cap the agent
    at a few hundred connections. Returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    keep_buffers_on_heap()
    logging.getLogger("agent").info("open files limit: %d", raise_fd_limit())
    uvloop.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
