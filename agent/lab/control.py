"""What ``ambit lab`` does: bring a lab up and down, start and stop its agents, report its status.

Workloads of a lab made with ``--nodes N --pods M --namespaces A,B,...``: pod k (1..M) of node i (1..N) is
``app-<i>-<k>`` in namespace ``namespaces[(k-1) % len(namespaces)]``, with service account ``app-<i>-<k>``
(so every pod has its own SPIFFE identity, spiffe://cluster.local/ns/<ns>/sa/app-<i>-<k>) and the label
``app: app-<i>-<k>``. Namespace objects: the given ones plus ``istio-system`` (the root namespace, for
mesh-wide policies). Nothing is enrolled at start.
"""

from __future__ import annotations

import datetime as dt
import secrets
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import yaml

from agent.ca.authority import CertificateAuthority
from agent.ca.issue import CERT_FILE, KEY_FILE, issue
from agent.capture import netns
from agent.lab import hosts, pods, services
from agent.lab import runtime as rt
from agent.lab import state as st
from agent.lab.runtime import LabError, LabInfo, LabPaths, NodeInfo, PodInfo, ProcRecord
from agent.lab.state import ROOT_NAMESPACE, LabObjects, atomic_write, check_dns_label, namespace_object, pod_object
from agent.lab.topology import Lab
from agent.mesh import views
from agent.mesh.convert import ObjectError
from agent.mesh.store import MeshState
from agent.policy import PolicyEngine

CA_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
DRAIN_SECONDS = 10.0  # a stopped agent lets its proxied connections finish this long (an upgrade's overlap)
Say = Callable[[str], None]


class NotReady(LabError):
    """A process did not report ready in time, or died first; the message carries its log's tail."""


def _quiet(_msg: str) -> None:
    pass


# -- planning -------------------------------------------------------------------------------------------------
def plan(topo: Lab, namespaces: Sequence[str]) -> tuple[list[NodeInfo], list[PodInfo]]:
    """Names for the topology's nodes and pods (see the module docstring)."""
    nodes = [NodeInfo(name=f"node-{n.index + 1}", index=n.index, netns=n.netns, ip=n.ip, uplink=n.uplink,
                      pod_cidr=n.pod_cidr, ip6=n.ip6, pod_cidr6=n.pod_cidr6) for n in topo.nodes]
    pods = []
    for node, tnode in zip(nodes, topo.nodes, strict=True):
        for k, tpod in enumerate(topo.pods_of(tnode), 1):
            name = f"app-{node.index + 1}-{k}"
            pods.append(PodInfo(namespace=namespaces[(k - 1) % len(namespaces)], name=name, node=node.name,
                                netns=tpod.netns, ip=tpod.ip, ifname=tpod.ifname, host_ifname=tpod.host_ifname,
                                service_account=name, ip6=tpod.ip6))
    return nodes, pods


def initial_state(info: LabInfo) -> LabObjects:
    nodes = {n.name: n for n in info.nodes}
    return LabObjects([
        *(namespace_object(ns) for ns in info.namespaces),
        *(pod_object(namespace=p.namespace, name=p.name, uid=str(uuid.uuid4()), node=p.node, pod_ips=p.ips,
                     host_ip=nodes[p.node].ip, service_account=p.service_account, labels={"app": p.name})
          for p in info.pods),
    ])


def write_initial_state(info: LabInfo, paths: LabPaths, say: Say = _quiet) -> None:
    """The state file, and what follows it: each node's kube-proxy table, each pod's hosts file."""
    state = initial_state(info)
    state.save(paths.state)
    say("setting up each node's kube-proxy (nftables) and the pods' Service names (hosts files)")
    services.sync(info, state.objects)


def write_tokens(paths: LabPaths, nodes: Sequence[NodeInfo]) -> None:
    """One random bearer token per node: tokens.yaml for the CA, tokens/<node> for the node's agent."""
    paths.tokens_dir.mkdir(mode=0o700, exist_ok=True)
    tokens = {}
    for node in nodes:
        token = secrets.token_urlsafe(32)
        tokens[token] = node.name
        atomic_write(paths.token_file(node.name), (token + "\n").encode(), mode=0o600)
    atomic_write(paths.tokens, yaml.safe_dump(tokens).encode(), mode=0o600)


def ca_argv(info: LabInfo, paths: LabPaths) -> list[str]:
    return [rt.python(), "-m", "agent.ca", "--dir", str(paths.ca_dir), "--trust-domain", info.trust_domain,
            "--listen", info.ca_address, "--tokens", str(paths.tokens), "--pods", str(paths.state)]


def agent_argv(info: LabInfo, paths: LabPaths, node: NodeInfo) -> list[str]:
    """The agent's command line (the contract with agent/__main__.py). The Observer is on the unix socket
    only, unless the lab was made with observer_tls: then also on the node's address, mutual TLS."""
    for sock in (paths.observer_socket(node.name), paths.admin_socket(node.name)):
        sock.parent.mkdir(parents=True, exist_ok=True)
    tls = paths.observer_tls
    observer_tcp = ["--observer-listen", f"{node.ip}:{rt.OBSERVER_PORT}",
                    "--observer-tls-cert-file", str(tls / CERT_FILE), "--observer-tls-key-file", str(tls / KEY_FILE),
                    "--observer-tls-client-ca-files", str(paths.trust_bundle)] if info.observer_tls else []
    return [rt.python(), "-m", "agent", "run", "--node", node.name, "--state", str(paths.state),
            "--observer-socket", str(paths.observer_socket(node.name)), *observer_tcp,
            "--admin-socket", str(paths.admin_socket(node.name)),
            "--ca", info.ca_address, "--ca-token", str(paths.token_file(node.name)),
            "--trust-bundle", str(paths.trust_bundle), "--trust-domain", info.trust_domain,
            "--uplink", node.uplink, "--drain-seconds", f"{DRAIN_SECONDS:g}", *info.agent_flags]


def start_ca(info: LabInfo, paths: LabPaths, say: Say) -> None:
    """The cluster state (with each node's kube-proxy and the pods' names), the nodes' tokens, the CA (until
    ready), and the Observer certificates it issues."""
    write_initial_state(info, paths, say)
    write_tokens(paths, info.nodes)
    paths.ca_dir.mkdir(mode=0o700)
    say(f"starting the CA in {info.nodes[0].netns} on {info.ca_address}")
    ca = rt.spawn(paths, "ca", info.nodes[0].netns, ca_argv(info, paths))
    wait_ready([ca], rt.CA_READY, CA_TIMEOUT)
    if info.observer_tls:
        issue_observer_certificates(info, paths)
        say(f"Observer certificates: the agents' in {paths.observer_tls}, the operator's in {paths.operator}")


def issue_observer_certificates(info: LabInfo, paths: LabPaths) -> None:
    """The agents' Observer server certificate and the operator's, from the lab's CA (what `ambit ca --issue
    observer|operator` writes)."""
    authority = CertificateAuthority.load(paths.ca_dir, info.trust_domain)
    issue(authority, "observer", paths.observer_tls)
    issue(authority, "operator", paths.operator)


def wait_ready(recs: Sequence[ProcRecord], needle: str, timeout: float) -> None:
    """Wait until every process's output of this run contains `needle`; NotReady (with the log's tail) as
    soon as one dies, or when `timeout` passes."""
    deadline = time.monotonic() + timeout
    pending = list(recs)
    while pending:
        for rec in list(pending):
            if needle in rec.output():
                pending.remove(rec)
            elif not rt.alive(rec):
                raise NotReady(f"{rec.name} exited before it was ready; end of {rec.log}:\n"
                               + rt.tail(rec.output()))
        if pending and time.monotonic() >= deadline:
            rec = pending[0]
            raise NotReady(f"{rec.name} not ready after {timeout:g}s (no {needle!r} in its output; "
                           f"still running as pid {rec.pid}); "
                           f"end of {rec.log}:\n" + rt.tail(rec.output()))
        if pending:
            time.sleep(0.05)


# -- up / down ---------------------------------------------------------------------------------------------------
def up(name: str, *, nodes: int = 2, pods: int = 2, namespaces: Sequence[str] = ("default",), agents: bool = True,
       fail_open: bool = False, timeout: float = 60.0, say: Say = _quiet, agent_flags: Sequence[str] = (),
       observer_tls: bool = False, dual_stack: bool = False) -> LabInfo:
    """Build a lab and leave it running. On any failure (also Ctrl-C) everything made so far is removed
    before the error propagates; the logs are kept in a temporary directory named in the error.
    ``agent_flags`` are added to every agent's command line (e.g. ``["--flows", "256"]``); they are kept in
    lab.json, so agents restarted later get them too. ``observer_tls``: the agents also serve the Observer on
    their node's address, port 4244, to clients with the operator's certificate (written to operator/).
    ``dual_stack``: every node and pod has an IPv6 address beside its IPv4 one (``topology``), and each pod's
    ``status.podIPs`` lists both, and Services may have IPv6 cluster IPs (``service_ips``); without it the lab is
    IPv4 only, as ``make demo`` runs it."""
    paths = LabPaths.of(name)
    if not 1 <= nodes <= 200 or not 0 <= pods <= 200:
        raise LabError("--nodes must be 1..200 and --pods 0..200")
    spaces = list(dict.fromkeys(check_dns_label(ns, "namespace") for ns in namespaces))
    if not spaces:
        raise LabError("at least one namespace is needed for the pods")
    hint = f"remove it with: ambit lab down --name {name}"
    if paths.root.exists():
        raise LabError(f"lab {name!r} already exists ({paths.root}); {hint}")
    if leftovers := rt.lab_namespaces(name, None):
        raise LabError(f"network namespaces of an earlier lab {name!r} are left ({', '.join(leftovers[:3])}...); "
                       f"{hint}")
    paths.root.parent.mkdir(parents=True, exist_ok=True)
    try:
        paths.root.mkdir(mode=0o755)
    except FileExistsError:
        raise LabError(f"lab {name!r} already exists ({paths.root}); {hint}") from None
    info = LabInfo(name=name, prefix=rt.netns_prefix(name), created_at=dt.datetime.now(dt.UTC).isoformat(),
                   namespaces=[*spaces, *([ROOT_NAMESPACE] if ROOT_NAMESPACE not in spaces else [])],
                   agents=agents, agent_flags=[*(["--fail-open"] if fail_open else []), *agent_flags],
                   observer_tls=observer_tls, dual_stack=dual_stack)
    try:
        info.save(paths)
        stack = ", dual stack (IPv4 and IPv6)" if dual_stack else ""
        say(f"building {nodes} node(s) with {pods} pod(s) each{stack}")
        topo = Lab.up(nodes=nodes, pods_per_node=pods, prefix=info.prefix, dual_stack=dual_stack)
        info.lab_id, info.switch, info.netns = topo.lab_id, topo.switch, topo.namespaces
        info.nodes, info.pods = plan(topo, spaces)
        info.ca_node, info.ca_address = info.nodes[0].name, f"{info.nodes[0].ip}:{rt.CA_PORT}"
        info.save(paths)
        start_ca(info, paths, say)
        if agents:
            start_agents(info, paths, [n.name for n in info.nodes], timeout, say)
        info.phase = "running"
        info.save(paths)
        return info
    except BaseException as e:
        # A second Ctrl-C or SIGTERM must not cut the (bounded) cleanup short: hold them until it is done.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
        kept = None
        try:
            kept = _keep_logs(paths)
            down(name, timeout=STOP_TIMEOUT)
        except Exception as cleanup:  # report both; the original error is the one that matters
            e.add_note(f"cleanup after the failed `up` also failed: {cleanup}")
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        if kept:
            e.add_note(f"logs of the failed lab: {kept}")
        raise


def _keep_logs(paths: LabPaths) -> str | None:
    if not rt.any_child(paths.logs):
        return None
    dest = tempfile.mkdtemp(prefix=f"ambit-lab-{paths.root.name}-logs-")
    shutil.copytree(paths.logs, dest, dirs_exist_ok=True)
    return dest


def down(name: str, *, timeout: float = STOP_TIMEOUT, say: Say = _quiet) -> bool:
    """Remove everything lab `name` made, whatever state it is in: its processes (SIGTERM, SIGKILL after
    `timeout`), any other process in its namespaces, its namespaces (with the agents' eBPF attachments),
    its directory.
    Returns False when there was nothing to remove."""
    paths = LabPaths.of(name)
    info: LabInfo | None = None
    if paths.lab_json.exists():
        try:
            info = LabInfo.load(paths)
        except LabError as e:
            say(f"warning: {e}; sweeping by name")
    spaces = rt.lab_namespaces(name, info)
    if not paths.root.exists() and not spaces:
        return False
    errors: list[str] = []

    def stop_recorded() -> list[str]:
        return rt.stop(rt.records(paths), timeout)

    def stop_strays() -> list[str]:  # anything else running in the lab's namespaces (`lab exec` leftovers)
        return rt.stop(rt.processes_in(spaces), min(timeout, 3.0))

    for step in (stop_recorded, stop_strays):
        try:
            for line in step():
                say(line)
        except (LabError, OSError) as e:
            errors.append(str(e))
    for lab_id in dict.fromkeys(_lab_ids(name, info, spaces)):
        prefix = rt.netns_prefix(name)
        lab = Lab(lab_id=lab_id, prefix=prefix, switch=f"{prefix}{lab_id}-sw",
                  created=[n for n in (info.netns if info else []) if n.startswith(f"{prefix}{lab_id}-")])
        try:
            lab.down()
        except RuntimeError as e:
            errors.append(str(e))
    if left := rt.lab_namespaces(name, None):
        errors.append("namespaces left: " + ", ".join(left))
    else:
        say(f"removed {len(spaces)} network namespace(s)")
    if left := hosts.remove(spaces, rt.netns_prefix(name)):
        errors.append("hosts files left: " + ", ".join(left))
    try:
        rt.remove_tree(paths.root)
        say(f"removed {paths.root}")
    except LabError as e:
        errors.append(str(e))
    if errors:
        raise LabError(f"lab {name!r} not fully removed: " + "; ".join(errors))
    return True


def _lab_ids(name: str, info: LabInfo | None, spaces: Sequence[str]) -> list[str]:
    """Topology ids of the lab's namespaces (`<name>.<id>-...`)."""
    prefix = rt.netns_prefix(name)
    ids = [info.lab_id] if info is not None and info.lab_id else []
    return ids + [ns[len(prefix):].split("-", 1)[0] for ns in spaces if ns.startswith(prefix)]


# -- the cluster state --------------------------------------------------------------------------------------------
@contextmanager
def edit(info: LabInfo, paths: LabPaths) -> Iterator[LabObjects]:
    """Change the cluster state (``state.edit``); when it changed, the nodes' kube-proxy tables and the pods'
    hosts files follow it before the lock is released (``services.sync``)."""
    with st.edit(paths.state, lambda state: _sync(info, state)) as state:
        yield state


def _sync(info: LabInfo, state: LabObjects) -> None:
    try:
        services.sync(info, state.objects)
    except (LabError, OSError) as e:
        raise LabError(f"the cluster state is saved, but the nodes do not follow it yet: {e}") from e


def apply(info: LabInfo, paths: LabPaths, objects: Sequence[dict[str, Any]]) -> list[str]:
    """Create or replace objects as ``kubectl apply -f`` does (whole objects, no field merging), after the
    checks a cluster makes: Istio's webhook for policies, the API server for Services and EndpointSlices
    (which also gives a Service its cluster IP and node ports); a Pod changes one of the lab's pods (``pods``).
    Any refusal refuses the whole batch (LabError naming each object and field); else one
    "<resource>/<name> created|configured|unchanged" line per object."""
    errors = [str(e) for e in PolicyEngine().update(objects)]
    with edit(info, paths) as state:
        errors += services.admit(state, objects, dual_stack=info.dual_stack) + pods.admit(state, objects)
        if errors:
            raise LabError("refused (nothing applied):\n  " + "\n  ".join(errors))
        return [f"{resource(obj['kind'])}/{obj['metadata']['name']} {state.put(obj)}" for obj in objects]


RESOURCES = {"AuthorizationPolicy": "authorizationpolicy.security.istio.io",
             "PeerAuthentication": "peerauthentication.security.istio.io", "Namespace": "namespace",
             "Service": "service", "EndpointSlice": "endpointslice.discovery.k8s.io", "Pod": "pod"}


def resource(kind: str) -> str:
    """kubectl's name of a kind in its messages (``service/web created``)."""
    return RESOURCES.get(kind, kind.lower())


# -- agents ------------------------------------------------------------------------------------------------------
def node_names(info: LabInfo, which: str) -> list[str]:
    """`which` is a node name, its number, or "all"."""
    if which == "all":
        return [n.name for n in info.nodes]
    return [info.node(f"node-{which}" if which.isdigit() else which).name]


def start_agents(info: LabInfo, paths: LabPaths, nodes: Sequence[str], timeout: float, say: Say = _quiet) -> None:
    """Start the agents of `nodes` (in parallel) and wait until each prints its ready line."""
    recs = []
    for name in nodes:
        node = info.node(name)
        rec = ProcRecord.load(paths.pid_file(rt.agent_proc(name)))
        if rec is not None and rt.alive(rec):
            raise LabError(f"the agent of {name} is already running (pid {rec.pid}); "
                           f"ambit lab agent restart {name} --name {info.name}")
        if not paths.trust_bundle.exists():
            raise LabError(f"no trust bundle {paths.trust_bundle}: the CA has not started")
        say(f"starting the agent of {name} in {node.netns}")
        recs.append(rt.spawn(paths, rt.agent_proc(name), node.netns, agent_argv(info, paths, node)))
    wait_ready(recs, rt.AGENT_READY, timeout)
    for rec in recs:
        say(f"{rec.name} ready (pid {rec.pid}, {time.time() - rec.started_at:.1f}s)")


def upgrade_agents(info: LabInfo, paths: LabPaths, nodes: Sequence[str], timeout: float,
                   say: Say = _quiet) -> list[str]:
    """An upgrade as a DaemonSet with maxSurge does it: the next agent starts beside the running one (same
    ports, SO_REUSEPORT), adopts the node, then the old one gets SIGTERM and drains its connections."""
    old = []
    for name in nodes:
        pid_file = paths.pid_file(rt.agent_proc(name))
        rec = ProcRecord.load(pid_file)
        if rec is None or not rt.alive(rec):
            raise LabError(f"the agent of {name} is not running: nothing to upgrade")
        old.append(rec)
        pid_file.unlink()  # the record is the next agent's from now on
    try:
        start_agents(info, paths, nodes, timeout, say)
    finally:
        report = rt.stop(old, DRAIN_SECONDS + STOP_TIMEOUT)
    return report


def stop_agents(paths: LabPaths, nodes: Sequence[str], kill: bool = False, timeout: float = STOP_TIMEOUT) -> list[str]:
    """Stop agents (SIGTERM, or SIGKILL with `kill`, which leaves their eBPF programs in place exactly as a
    crash does); forget their records."""
    report = []
    recs = []
    for name in nodes:
        pid_file = paths.pid_file(rt.agent_proc(name))
        rec = ProcRecord.load(pid_file)
        if rec is None or not rt.alive(rec):
            report.append(f"the agent of {name} is not running")
            pid_file.unlink(missing_ok=True)
        else:
            recs.append(rec)
    report += rt.stop(recs, timeout, kill=kill)
    for rec in recs:
        paths.pid_file(rec.name).unlink(missing_ok=True)
    return report


# -- status ------------------------------------------------------------------------------------------------------
def proc_status(paths: LabPaths, proc: str, needle: str) -> dict[str, Any]:
    """{"state": ready|starting|exited|not running, "pid", "log"} of a lab process."""
    rec = ProcRecord.load(paths.pid_file(proc))
    log = str(paths.log_file(proc))
    if rec is None:
        return {"state": "not running", "pid": None, "log": log}
    if not rt.alive(rec):
        return {"state": "exited", "pid": rec.pid, "log": log}
    return {"state": "ready" if needle in rec.output() else "starting", "pid": rec.pid, "log": log}


def status(name: str) -> dict[str, Any]:
    """Everything `ambit lab status` shows, as plain data (also its --json output)."""
    paths = LabPaths.of(name)
    info = LabInfo.load(paths)
    try:
        state: LabObjects | None = LabObjects.load(paths.state)
    except (OSError, LabError, ValueError):
        state = None
    by_key = {p.key: p for p in info.pods}
    mesh, errors = services.mesh_state(state.objects) if state is not None else (None, [])
    pods = []
    for obj in state.of_kind("Pod") if state else []:
        meta, spec, st = obj.get("metadata", {}), obj.get("spec", {}), obj.get("status", {})
        pod = by_key.get(f"{meta.get('namespace', 'default')}/{meta.get('name')}")
        workload = mesh.by_ip(st.get("podIP") or "") if mesh is not None else None
        pods.append({"namespace": meta.get("namespace", "default"), "name": meta.get("name"),
                     "node": spec.get("nodeName"), "ip": st.get("podIP"), "ips": _pod_ips(st),
                     "service_account": spec.get("serviceAccountName") or "default",
                     "labels": meta.get("labels") or {}, "enrolled": state.is_enrolled(obj) if state else False,
                     "probe_ports": sorted(workload.probe_ports) if workload is not None else [],
                     "netns": pod.netns if pod else None, "host_ifname": pod.host_ifname if pod else None})
    return {
        "name": info.name, "dir": str(paths.root), "phase": info.phase, "trust_domain": info.trust_domain,
        **service_status(mesh, errors),
        "state_file": str(paths.state), "trust_bundle": str(paths.trust_bundle), "logs": str(paths.logs),
        "ca": {"node": info.ca_node, "address": info.ca_address,
               "netns": info.node(info.ca_node).netns if info.ca_node else None,
               **proc_status(paths, "ca", rt.CA_READY)},
        "dual_stack": info.dual_stack,
        "nodes": [{"name": n.name, "netns": n.netns, "ip": n.ip, "ips": [ip for ip in (n.ip, n.ip6) if ip],
                   "uplink": n.uplink, "pod_cidr": n.pod_cidr,
                   "pod_cidrs": [c for c in (n.pod_cidr, n.pod_cidr6) if c],
                   "agent": proc_status(paths, rt.agent_proc(n.name), rt.AGENT_READY)} for n in info.nodes],
        "namespaces": [{"name": o["metadata"]["name"], "labels": o["metadata"].get("labels") or {}}
                       for o in (state.of_kind("Namespace") if state else [])],
        "pods": pods,
        "state_error": None if state is not None else f"cannot read {paths.state}",
    }


def _pod_ips(status: Any) -> list[str]:
    """A Pod's addresses as its status gives them: status.podIPs, else status.podIP (what kubectl shows)."""
    if not isinstance(status, dict):
        return []
    listed = [entry.get("ip") for entry in status.get("podIPs") or [] if isinstance(entry, dict)]
    ips = [ip for ip in listed if isinstance(ip, str) and ip]
    return ips or ([status["podIP"]] if isinstance(status.get("podIP"), str) and status["podIP"] else [])


def service_status(mesh: MeshState | None, errors: Sequence[ObjectError]) -> dict[str, Any]:
    """``services``: each Service of the agents' view of the cluster state (``services.mesh_state``) with its VIPs,
    ports and endpoints; ``service_errors``: the objects they refuse."""
    if mesh is None:
        return {"services": [], "service_errors": []}
    found = [views.service(mesh.services[key], mesh.endpoints.get(key, {})) for key in sorted(mesh.services)]
    return {"services": found, "service_errors": [str(e) for e in errors]}


def resolve_target(info: LabInfo, target: str) -> str:
    """The network namespace for `ambit lab exec TARGET`: a pod (NS/NAME, or NAME if unique) or a node."""
    if "/" in target:
        matches = [p for p in info.pods if p.key == target]
    else:
        matches = [p for p in info.pods if p.name == target]
        if not matches and any(n.name == target for n in info.nodes):
            return info.node(target).netns
    if len(matches) > 1:
        raise LabError(f"pod name {target!r} is ambiguous: " + ", ".join(p.key for p in matches))
    if not matches:
        raise LabError(f"no pod or node {target!r} in lab {info.name!r} (see: ambit lab status --name {info.name})")
    if matches[0].netns not in netns.list_netns():
        raise LabError(f"the network namespace {matches[0].netns} of {target} is gone")
    return matches[0].netns
