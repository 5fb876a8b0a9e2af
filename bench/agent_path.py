"""``python -m bench.agent_path``: the node agents' Python per proxied connection, outside the tunnel library.

In one process, no I/O: two agents' meshes (node-a: the client pod's, node-b: the server pod's) on the lab's
shape of mesh state (a few namespaces and pods, a Service, a mesh-wide STRICT PeerAuthentication and
AuthorizationPolicies the server's connections are checked against). Per connection:

* client agent: the enrolled source at the accepted address, its route, its certificate (already issued, as
  on a warm agent), the CONNECT authority, the flow opened, the connection tracked, then closed (flow ended);
* server agent: the CONNECT request's policy decision, the flow opened (with the Service guessed), the
  connection tracked, then closed.

What the tunnel library does (accept, TLS, h2, relaying) and the sockets are not here: ``bench.connprofile``
measures the whole in the lab. Prints CPU microseconds per connection per side, the median of ``--runs``;
``--profile`` prints cProfile's top functions of one more run per side instead.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import datetime as dt
import gc
import pstats
import statistics
import time
from collections.abc import Callable
from typing import Any

from agent.ca.authority import CertificateAuthority
from agent.identity.manager import CertificateManager
from agent.lab.state import namespace_object, pod_object
from agent.mesh.store import MeshStore
from agent.proxy.authorize import Authorizer
from agent.proxy.context import Mesh
from agent.proxy.inbound import InboundProxy
from agent.proxy.outbound import OutboundProxy
from agent.telemetry.hub import Telemetry, TelemetryConfig
from hbone import Authority, InboundRequest, Pool, SpiffeId, TrustBundle

TRUST_DOMAIN = "cluster.local"
CLIENT_NODE, SERVER_NODE = "node-a", "node-b"
CLIENT_IP, SERVER_IP, VIP = "10.244.1.10", "10.244.2.10", "10.96.0.20"
PORT = 8080
NODE_IPS = {CLIENT_NODE: "192.168.10.1", SERVER_NODE: "192.168.10.2"}
Obj = dict[str, Any]


def _pod(name: str, namespace: str, ip: str, node: str, app: str) -> Obj:
    return pod_object(namespace=namespace, name=name, uid=f"uid-{namespace}-{name}", node=node, pod_ips=[ip],
                      host_ip=NODE_IPS[node], service_account=app, labels={"app": app, "version": "v1"})


def _policy(kind: str, name: str, namespace: str, spec: Obj) -> Obj:
    return {"apiVersion": "security.istio.io/v1", "kind": kind, "metadata": {"name": name, "namespace": namespace},
            "spec": spec}


def lab_objects() -> list[Obj]:
    """The lab's shape: client and server namespaces (ambient), a few more pods, a Service, policies."""
    ambient = {"istio.io/dataplane-mode": "ambient"}
    objects = [namespace_object(ns, ambient) for ns in ("bench-client", "bench-server", "shop")]
    objects.append(namespace_object("istio-system"))
    objects += [_pod("client-0", "bench-client", CLIENT_IP, CLIENT_NODE, "client"),
                _pod("server-0", "bench-server", SERVER_IP, SERVER_NODE, "server")]
    objects += [_pod(f"shop-{i}", "shop", f"10.244.{1 + i % 2}.{20 + i}", (CLIENT_NODE, SERVER_NODE)[i % 2],
                     f"shop{i % 3}") for i in range(6)]
    objects.append({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "server", "namespace": "bench-server"},
                    "spec": {"clusterIP": VIP, "clusterIPs": [VIP], "selector": {"app": "server"},
                             "ports": [{"port": 80, "targetPort": PORT, "protocol": "TCP"}]}})
    objects += [
        _policy("PeerAuthentication", "default", "istio-system", {"mtls": {"mode": "STRICT"}}),
        _policy("AuthorizationPolicy", "deny-admin", "istio-system",
                {"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["15000", "9090"]}}]}]}),
        _policy("AuthorizationPolicy", "clients", "bench-server",
                {"selector": {"matchLabels": {"app": "server"}}, "action": "ALLOW",
                 "rules": [{"from": [{"source": {"principals": [f"{TRUST_DOMAIN}/ns/bench-client/sa/client"]}}],
                            "to": [{"operation": {"ports": [str(PORT)]}}]},
                           {"from": [{"source": {"namespaces": ["shop"]}}]}]}),
        _policy("AuthorizationPolicy", "shop", "shop",
                {"action": "ALLOW", "rules": [{"from": [{"source": {"namespaces": ["shop", "bench-client"]}}]}]}),
    ]
    return objects


class _LocalCa:
    """Issues workload certificates in process (a warm agent has them already; only the first get waits)."""

    def __init__(self, authority: CertificateAuthority) -> None:
        self.authority = authority

    async def create_certificate(self, csr_pem: bytes, identity: SpiffeId | None,
                                 validity: dt.timedelta | None = None) -> list[bytes]:
        assert identity is not None
        return self.authority.sign_csr(csr_pem, identity)

    def set_trust_bundle(self, bundle: TrustBundle) -> None:
        pass


class _Connection:
    """What the proxies track: a relay's or splice's surface, closed by the bench."""

    def __init__(self) -> None:
        self.closed = False
        self.on_close: Callable[[Any, str], None] | None = None
        self.bytes_up = self.bytes_down = 100

    def abort(self) -> None:
        self.finish("aborted")

    def finish(self, reason: str = "closed") -> None:
        self.closed = True
        if self.on_close is not None:
            self.on_close(self, reason)


class Agents:
    """Both nodes' agents, wired as ``agent.node`` wires them, minus sockets and listeners."""

    def __init__(self, authority: CertificateAuthority, store: MeshStore) -> None:
        self.store = store
        self.certificates = CertificateManager(_LocalCa(authority), authority.trust_bundle)
        self.client = self._mesh(CLIENT_NODE)
        self.server = self._mesh(SERVER_NODE)
        self.outbound = OutboundProxy(self.client, InboundProxy(self.client))
        self.inbound = InboundProxy(self.server)

    def _mesh(self, node: str) -> Mesh:
        pool = Pool(lambda: self.certificates.trust_bundle)
        telemetry = Telemetry(node, self.store, TRUST_DOMAIN, TelemetryConfig())
        authorizer = Authorizer(self.store)
        return Mesh(node, TRUST_DOMAIN, self.store, self.certificates, pool, frozenset(), telemetry, policy=authorizer)

    async def client_side(self, target: tuple[str, int], port: int) -> None:
        """The client agent's steps for one connection from the client pod's ``port`` to ``target``."""
        client = (CLIENT_IP, port)
        plan = self.outbound._plan(client, target)
        assert plan is not None and plan.authority is not None
        await self.certificates.get(plan.identity)
        conn = _Connection()
        self.outbound._opened("outbound-hbone", conn, client, plan.route, mtls=True)
        conn.finish()

    def server_side(self, request: InboundRequest) -> None:
        """The server agent's steps for one admitted CONNECT."""
        assert self.inbound._decide(request) is None
        conn = _Connection()
        self.inbound._opened(request, conn)
        conn.finish()


def request_for(port: int) -> InboundRequest:
    """The CONNECT the server agent gets from the client pod's ``port`` (as the tunnel library hands it)."""
    return InboundRequest(SpiffeId(TRUST_DOMAIN, "bench-client", "client"), (CLIENT_IP, 40000),
                          (SERVER_IP, 15008), Authority(SERVER_IP, PORT),
                          {"forwarded": f'for="{CLIENT_IP}:{port}"', "traceparent": "00-1-1-00"})


async def _time_client(agents: Agents, target: tuple[str, int], count: int) -> float:
    start = time.process_time()
    for i in range(count):
        await agents.client_side(target, 30000 + i % 20000)
    return time.process_time() - start


def _time_server(agents: Agents, requests: list[InboundRequest], count: int) -> float:
    start = time.process_time()
    for i in range(count):
        agents.server_side(requests[i % len(requests)])
    return time.process_time() - start


def _median_us(runs: int, count: int, once: Callable[[], float]) -> tuple[float, float, float]:
    gc.collect()
    times = [once() / count * 1e6 for _ in range(runs)]
    return statistics.median(times), min(times), max(times)


def _profile(title: str, once: Callable[[], object], top: int) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    once()
    profiler.disable()
    print(f"--- {title}")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(top)


async def main_async(args: argparse.Namespace) -> None:
    store = MeshStore()
    errors = store.apply(lab_objects())
    if errors:
        raise SystemExit(f"bench state rejected: {errors}")
    agents = Agents(CertificateAuthority.create(TRUST_DOMAIN), store)
    target = (VIP, 80) if args.service else (SERVER_IP, PORT)
    requests = [request_for(30000 + i) for i in range(256)]  # (the tunnel library builds one per stream)
    await _time_client(agents, target, 100)  # warm: certificate issued, caches and metric series made
    _time_server(agents, requests, 100)
    server = _median_us(args.runs, args.count, lambda: _time_server(agents, requests, args.count))
    client_times = [await _time_client(agents, target, args.count) / args.count * 1e6 for _ in range(args.runs)]
    client = statistics.median(client_times), min(client_times), max(client_times)
    path = f"client pod -> Service {VIP}:80" if args.service else f"client pod -> server pod {SERVER_IP}:{PORT}"
    print(f"agent path ({path}), CPU per connection, median of {args.runs} x {args.count:,}:")
    for side, (median, low, high) in (("client agent", client), ("server agent", server)):
        print(f"  {side}: {median:6.1f} us  (range {low:.1f}-{high:.1f})")
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        await _time_client(agents, target, args.count)
        profiler.disable()
        print("--- client agent")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.top)
        _profile("server agent", lambda: _time_server(agents, requests, args.count), args.top)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.agent_path", description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=20_000, help="connections per run (default 20000)")
    parser.add_argument("--runs", type=int, default=7, help="runs per side; the median is reported (default 7)")
    parser.add_argument("--service", action="store_true", help="connect to the Service VIP, not the pod")
    parser.add_argument("--profile", action="store_true", help="then cProfile one more run per side")
    parser.add_argument("--top", type=int, default=30, help="functions shown with --profile (default 30)")
    asyncio.run(main_async(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
