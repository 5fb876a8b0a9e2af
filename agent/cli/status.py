"""``ambit status``: each agent's view of its node, and ``ambit policy explain``: who would decide a connection.

    ambit status [--lab NAME] [--admin URL_OR_SOCKET ...]
    ambit policy explain SRC DST:PORT [--lab NAME | --state FILE | --kubernetes [--kubeconfig F] [--context C]]

``status`` reads each agent's /config_dump and readiness: from the lab's admin sockets, or from agents
given by --admin (a unix socket path, or http://HOST:PORT). In Kubernetes the agents serve them on their
socket only: ``kubectl -n ambit-system exec <agent pod> -- ambit status --admin /run/ambit/admin.sock``.
``explain`` runs the same policy engine the agents run, on the same cluster state, and names the policy and
rule that would decide.
SRC is a pod (NAMESPACE/NAME or NAME) or an IP; DST:PORT is a pod or IP with the port.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import ipaddress
import json
import sys
from pathlib import Path
from typing import Any

from agent.http import HttpClient, HttpError, Timeouts
from agent.kube.client import KubeConfigError
from agent.kube.source import KubeSource
from agent.lab import services
from agent.lab.runtime import LABS_ROOT, LabError, LabInfo, LabPaths, lab_name
from agent.mesh.model import ip_family
from agent.mesh.store import MeshState, MeshStore, Workload, build_state
from agent.policy import Peer, PolicyEngine, Target
from agent.sources.objectfile import kubernetes_objects
from hbone import canonical_ip, format_address, parse_host_port

TRUST_DOMAIN = "cluster.local"


# -- status ----------------------------------------------------------------------------------------------------
async def _get(where: str, path: str) -> tuple[int, str]:
    if where.startswith(("http://", "https://")):
        client, url = HttpClient(), where.rstrip("/") + path
    else:
        client, url = HttpClient(unix_socket=where), f"http://agent{path}"
    try:
        async with await client.request("GET", url, timeouts=Timeouts(total=5)) as response:
            return response.status, (await response.read()).decode(errors="replace")
    finally:
        await client.close()


async def _agent_status(where: str) -> dict[str, Any]:
    try:
        ready_code, ready = await _get(where, "/healthz/ready")
        code, body = await _get(where, "/config_dump")
    except (HttpError, OSError, TimeoutError) as e:
        return {"where": where, "error": f"agent unreachable: {e or type(e).__name__}"}
    if code != 200:
        return {"where": where, "error": f"/config_dump answered {code}: {body.strip()}"}
    dump: dict[str, Any] = json.loads(body)
    dump["where"], dump["ready"] = where, ready.strip() if ready_code == 200 else ready.strip() or "not ready"
    return dump


def _expiry(cert: dict[str, Any]) -> str:
    not_after = cert.get("not_after")
    if not not_after:
        return str(cert.get("state", "?"))
    left = dt.datetime.fromisoformat(not_after) - dt.datetime.now(dt.UTC)
    return f"{cert.get('state')}, expires {not_after} (in {left.total_seconds() / 3600:.1f} h)"


def _probes(workload: dict[str, Any]) -> str:
    ports = workload.get("probe_ports") or []
    return f"; probe ports {','.join(str(p) for p in ports)}" if ports else ""


def render_status(dump: dict[str, Any]) -> str:
    if "error" in dump:
        return f"{dump['where']}: {dump['error']}"
    enrolled = [w for w in dump.get("workloads", []) if w["node"] == dump["node"] and w["enrolled"]]
    backends = sorted({a["backend"] for a in dump.get("attachments", [])})
    lines = [f"{dump['node']}: {dump['ready']}; agent {dump.get('version', '?')}; "
             f"{len(dump.get('attachments', []))} eBPF attachments ({', '.join(backends) or '-'}); "
             f"{dump.get('connections', 0)} proxied connections"]
    lines.append("  enrolled pods: " + (", ".join(f"{w['namespace']}/{w['name']} ({w['ip']}{_probes(w)})"
                                                  for w in enrolled) or "none"))
    for cert in dump.get("certificates", []):
        lines.append(f"  certificate:   {cert['identity']}: {_expiry(cert)}")
    lines.append("  policies:      " + (", ".join(dump.get("policies", [])) or "none"))
    if "services" in dump:  # agents that know Services: each with its VIPs, ports and endpoints
        found = sorted(dump["services"], key=lambda s: (s["namespace"], s["name"]))
        lines += [f"  service:       {s['namespace']}/{s['name']} {','.join(s['vips']) or 'headless'} "
                  f"{services.ports_text(s['ports'])} -> {services.endpoints_text(s['endpoints'])}" for s in found]
        if not found:
            lines.append("  services:      none")
    return "\n".join(lines)


def _lab_admin_sockets(name: str, root: Path) -> list[str]:
    paths = LabPaths.of(name, root)
    info = LabInfo.load(paths)
    return [str(paths.admin_socket(node.name)) for node in info.nodes]


LAB_HELP = "(default: $AMBIT_LAB, else the only lab, else ambit)"


def status_main(argv: list[str], *, labs_root: Path = LABS_ROOT) -> int:
    ap = argparse.ArgumentParser(prog="ambit status", description="each agent's view of its node")
    ap.add_argument("--lab", help=f"the lab whose agents to ask {LAB_HELP}")
    ap.add_argument("--admin", action="append", help="an agent's admin endpoint: unix socket path or http://H:P")
    ap.add_argument("-o", "--output", choices=["text", "json"], default="text")
    args = ap.parse_args(argv)
    try:
        places = args.admin or _lab_admin_sockets(lab_name(args.lab, labs_root), labs_root)
    except (LabError, OSError) as e:
        print(f"ambit status: {e}; name agents with --admin", file=sys.stderr)
        return 1

    async def gather() -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(_agent_status(p) for p in places)))

    dumps = asyncio.run(gather())
    if args.output == "json":
        print(json.dumps(dumps, indent=2, sort_keys=True))
    else:
        print("\n".join(render_status(d) for d in dumps))
    return 0 if all("error" not in d for d in dumps) else 1


# -- policy explain ----------------------------------------------------------------------------------------------
def _find(state: MeshState, ref: str, family: int | None = None) -> tuple[str, Workload | None]:
    """(ip, workload) for a pod reference (NAMESPACE/NAME or NAME) or an IP; a pod's address of ``family`` when
    it has one (else its primary address)."""
    try:
        ip = canonical_ip(str(ipaddress.ip_address(ref)))
    except ValueError:
        ip = ""
    if ip in state.workloads:
        return ip, state.workloads[ip]
    namespace, _, name = ref.rpartition("/")
    found = [w for w in state.by_uid.values() if w.name == name and namespace in ("", w.namespace)]
    if len(found) > 1:
        raise ValueError(f"{ref!r} names pods in several namespaces: say NAMESPACE/NAME")
    if not found:
        if ip:
            return ip, None
        raise ValueError(f"no pod {ref!r} in the cluster state")
    return next((a for a in found[0].ips if ip_family(a) == family), found[0].ip), found[0]


def explain(state: MeshState, source: str, destination: str, port: int, trust_domain: str = TRUST_DOMAIN,
            root_namespace: str = "istio-system") -> str:
    dst_ip, dst = _find(state, destination)
    src_ip, src = _find(state, source, ip_family(dst_ip))  # a connection's two ends are of one family
    src_text = f"{src.key} ({src_ip})" if src else src_ip
    lines = []
    if src is not None and src.enrolled:
        principal = str(src.identity(trust_domain)).removeprefix("spiffe://")
        peer = Peer(principal, src.namespace, src_ip)
        lines.append(f"from {src_text}: in the mesh, arrives over HBONE as {principal} (mutual TLS)")
    else:
        peer = Peer(None, None, src_ip)
        lines.append(f"from {src_text}: not in the mesh, arrives as plaintext (no peer identity)")
    if dst is None or not dst.enrolled:
        to = f"{dst.key} ({dst_ip}):{port}" if dst else format_address(dst_ip, port)
        lines.append(f"to {to}: not in the mesh: "
                     "no agent decides, the connection passes through")
        return "\n".join(lines)
    engine = PolicyEngine(root_namespace)
    for error in engine.update(state.objects):
        lines.append(f"note: rejected and not in force: {error}")
    decision = engine.evaluate(peer, Target(dst.namespace, dst.labels, dst_ip, port))
    lines.append(f"to {dst.key} ({dst_ip}):{port}: decided by node {dst.node}'s agent")
    lines.append(f"decision: {'ALLOW' if decision.allowed else 'DENY'}: {decision.reason}")
    return "\n".join(lines)


async def _kubernetes_state(kubeconfig: Path | None, context: str | None) -> MeshState:
    store = MeshStore()
    source = await KubeSource.from_config(kubeconfig, store, context=context)
    task = asyncio.ensure_future(source.run())
    try:
        async with asyncio.timeout(30):
            await source.synced.wait()
        return store.state
    finally:
        await source.close()
        await task


def policy_main(argv: list[str], *, labs_root: Path = LABS_ROOT) -> int:
    ap = argparse.ArgumentParser(prog="ambit policy", description="which policy and rule decide a connection")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("explain", help="explain the decision on SRC -> DST:PORT")
    p.add_argument("source", help="pod (NAMESPACE/NAME or NAME) or IP")
    p.add_argument("destination", help="pod or IP, with :PORT")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--lab", help=f"the lab's cluster state {LAB_HELP}")
    where.add_argument("--state", type=Path, help="a cluster-state file of Kubernetes objects")
    where.add_argument("--kubernetes", action="store_true", help="read the cluster (in-cluster or --kubeconfig)")
    p.add_argument("--kubeconfig", type=Path, default=None)
    p.add_argument("--context", default=None,
                   help="with --kubernetes and a kubeconfig: the context to use (default: its current-context)")
    p.add_argument("--trust-domain", default=TRUST_DOMAIN)
    args = ap.parse_args(argv)
    try:
        target, port = parse_host_port(args.destination, "DST")
    except ValueError as e:
        print(f"ambit policy explain: {e}: DST must be POD:PORT, IP:PORT or [IPV6]:PORT", file=sys.stderr)
        return 2
    try:
        if args.kubernetes:
            state = asyncio.run(_kubernetes_state(args.kubeconfig, args.context))
        else:
            path = args.state or LabPaths.of(lab_name(args.lab, labs_root), labs_root).state
            state = build_state(kubernetes_objects(path.read_bytes()))
        print(explain(state, args.source, target, port, args.trust_domain))
    except (ValueError, OSError, LabError, KubeConfigError, TimeoutError) as e:
        print(f"ambit policy explain: {e or 'timed out'}", file=sys.stderr)
        return 1
    return 0
