"""``ambit lab``: a cluster of network namespaces with Ambit's CA and one agent per node.

    ambit lab up [--nodes N] [--pods M] [--namespaces A,B] [--dual-stack] [--no-agents] [--fail-open] [--timeout S]
    ambit lab down
    ambit lab status [--json]
    ambit lab exec POD|NS/POD|NODE -- CMD...
    ambit lab label namespace NS key=value|key- ... [--overwrite]
    ambit lab label pod NS/NAME key=value|key- ... [--overwrite]
    ambit lab apply -f FILE [-n NS]        (Namespace, Service, EndpointSlice, AuthorizationPolicy,
                                            PeerAuthentication, Pod)
    ambit lab delete KIND NAME... [-n NS] | -f FILE
    ambit lab agent start|stop|restart NODE|all [--kill] [--timeout S]

Every command takes --name LAB (default: $AMBIT_LAB, else "ambit"); the lab lives in /run/ambit/labs/LAB.
Enroll a namespace with: ambit lab label namespace default istio.io/dataplane-mode=ambient

Services work as in a cluster: a Service gets a cluster IP from 10.96.0.0/16 (or keeps the one it names), each
node's kube-proxy (nftables) sends traffic the agents do not capture from the VIP to an endpoint, and pods
resolve <svc>, <svc>.<ns> and <svc>.<ns>.svc.cluster.local (hosts files that `lab exec` mounts).
A NodePort (or LoadBalancer) Service also gets a node port per port from 30000-32767 (or keeps the one it
names): every node forwards <any of its addresses>:<node port> (not 127.0.0.1, as kube-proxy's nftables mode)
to an endpoint, masqueraded unless externalTrafficPolicy is Local; `status` shows it as 80:30080->8080/TCP.

Pods: `up` makes them; a Pod applied with `apply -f` is a new version of one of them (same node, address,
service account and uid), carrying its containers, e.g. their probes, whose ports the agents then know
(`status` PROBE PORTS, `ambit status`):
    kind: Pod
    metadata: {name: app-1-1, namespace: default}
    spec:
      containers:
      - name: app
        ports: [{name: http, containerPort: 8080}]
        readinessProbe: {httpGet: {path: /ready, port: http}}
        livenessProbe: {tcpSocket: {port: 8081}}
Labels and annotations it gives replace the pod's (else they stay); `delete` leaves pods alone.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

from agent.lab import control, services
from agent.lab import runtime as rt
from agent.lab import state as st
from agent.lab.runtime import LabError, LabInfo, LabPaths
from agent.sources.objectfile import kubernetes_objects

KINDS = {"namespace": "Namespace", "namespaces": "Namespace", "ns": "Namespace",
         "pod": "Pod", "pods": "Pod", "po": "Pod"}
SHORT_NAMES = {"ns": "Namespace", "svc": "Service"}


def _say(msg: str) -> None:
    print(msg, flush=True)


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def _labels(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in labels.items()) or "<none>"


def _proc(p: dict[str, Any]) -> str:
    return str(p["state"]) + (f" (pid {p['pid']})" if p["pid"] and p["state"] != "exited" else "")


# -- commands ----------------------------------------------------------------------------------------------------
def _raise_on_sigterm(signum: int, _frame: FrameType | None) -> None:
    raise LabError(f"interrupted by {signal.Signals(signum).name}")


def cmd_up(args: argparse.Namespace) -> int:
    # A SIGTERM or SIGHUP during `up` must unwind through its cleanup like Ctrl-C does.
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    signal.signal(signal.SIGHUP, _raise_on_sigterm)
    info = control.up(args.name, nodes=args.nodes, pods=args.pods, namespaces=args.namespaces.split(","),
                      agents=not args.no_agents, fail_open=args.fail_open, timeout=args.timeout, say=_say,
                      observer_tls=args.observer_tls, dual_stack=args.dual_stack)
    paths = LabPaths.of(info.name)
    flag = "" if info.name == rt.DEFAULT_NAME else f" --name {info.name}"
    print(f"\nlab {info.name!r} is up: {len(info.nodes)} node(s), {len(info.pods)} pod(s), "
          f"CA on {info.ca_address}, " + ("agents ready" if info.agents else "no agents"))
    print(f"  directory {paths.root}, state {paths.state}, logs {paths.logs}")
    if info.pods:
        first = info.pods[0]
        print(f"  try:  ambit lab status{flag}\n"
              f"        ambit lab exec{flag} {first.key} -- ip {'' if info.dual_stack else '-4 '}addr\n"
              f"        ambit lab label{flag} namespace {first.namespace} istio.io/dataplane-mode=ambient")
    if info.observer_tls:
        tls = [f"--tls-client-cert-file {paths.operator}/tls.crt", f"--tls-client-key-file {paths.operator}/tls.key",
               f"--tls-ca-cert-files {paths.operator}/ca.crt"]
        print(f"  flows over mutual TLS: ambit lab exec{flag} node-2 -- ambit observe --server "
              f"{info.nodes[0].ip}:{rt.OBSERVER_PORT} {' '.join(tls)}")
    print(f"  remove with: ambit lab down{flag}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    if not control.down(args.name, timeout=args.timeout, say=_say):
        print(f"no lab {args.name!r}: nothing to remove")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    s = control.status(args.name)
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    print(f"lab {s['name']} ({s['phase']})  dir {s['dir']}  trust domain {s['trust_domain']}")
    ca = s["ca"]
    print(f"CA: {_proc(ca)} on {ca['address']} in {ca['netns']}; trust bundle {s['trust_bundle']}\n")
    print(_table([["NODE", "NETNS", "IP", "UPLINK", "POD CIDR", "AGENT"],
                  *([n["name"], n["netns"], ",".join(n["ips"]), n["uplink"], ",".join(n["pod_cidrs"]),
                     _proc(n["agent"])] for n in s["nodes"])]))
    if s["state_error"]:
        print(f"\n{s['state_error']}")
    else:
        print()
        print(_table([["NAMESPACE", "LABELS"], *([n["name"], _labels(n["labels"])] for n in s["namespaces"])]))
        if s["pods"]:
            print()
            print(_table([["POD", "NODE", "IP", "SERVICE ACCOUNT", "ENROLLED", "LABELS", "NETNS", "PROBE PORTS"],
                          *([f"{p['namespace']}/{p['name']}", p["node"] or "-", ",".join(p["ips"]) or "-",
                             p["service_account"], "yes" if p["enrolled"] else "no", _labels(p["labels"]),
                             p["netns"] or "-", ",".join(str(n) for n in p["probe_ports"]) or "-"]
                            for p in s["pods"])]))
        if s["services"]:
            print()
            print(_table([["SERVICE", "CLUSTER-IP", "PORTS", "ENDPOINTS"],
                          *([f"{v['namespace']}/{v['name']}", ",".join(v["vips"]) or "None",
                             services.ports_text(v["ports"]), services.endpoints_text(v["endpoints"])]
                            for v in s["services"])]))
        for error in s["service_errors"]:
            print(f"not in the mesh: {error}")
    print(f"\nlogs: {s['logs']}/ (ca.log, agent-<node>.log)")
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise LabError("no command given: ambit lab exec POD -- CMD...")
    ns = control.resolve_target(LabInfo.load(LabPaths.of(args.name)), args.target)
    sys.stdout.flush()
    os.execvp("ip", ["ip", "netns", "exec", ns, *command])  # the command's exit code becomes ours


def cmd_label(args: argparse.Namespace) -> int:
    kind = KINDS.get(args.kind.lower())
    if kind is None:
        raise LabError(f"unknown kind {args.kind!r}: namespace or pod")
    namespace, name = "", args.object
    if kind == "Pod":
        namespace, _, name = args.object.rpartition("/")
        namespace = namespace or args.namespace
    changes = st.parse_label_changes(args.labels)
    paths = LabPaths.of(args.name)
    info = LabInfo.load(paths)  # a clear error when the lab does not exist
    with control.edit(info, paths) as state:
        print(state.label(kind, namespace, name, changes, overwrite=args.overwrite))
    return 0


def _objects_from(source: str) -> list[dict[str, Any]]:
    data = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
    try:
        objects = list(kubernetes_objects(data))
    except (ValueError, yaml.YAMLError) as e:
        raise LabError(f"{source}: {e}") from None
    for i, obj in enumerate(objects):
        if not isinstance(obj, dict) or not isinstance((obj.get("metadata") or {}).get("name"), str):
            raise LabError(f"{source}: object {i + 1} has no metadata.name")
        if obj.get("kind") not in control.RESOURCES:
            raise LabError(f"{source}: {obj.get('kind')} {obj['metadata']['name']}: the lab applies "
                           f"{', '.join(control.RESOURCES)}")
    return objects


def cmd_apply(args: argparse.Namespace) -> int:
    """Create or replace objects, like ``kubectl apply -f`` (whole objects, no field merging)."""
    paths = LabPaths.of(args.name)
    info = LabInfo.load(paths)
    objects = [obj for source in args.filename for obj in _objects_from(source)]
    for obj in objects:
        if obj["kind"] != "Namespace":
            obj["metadata"].setdefault("namespace", args.namespace)
    for line in control.apply(info, paths, objects):
        print(line)
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    """Delete objects named on the command line (KIND NAME... or KIND NS/NAME) or in files (-f)."""
    paths = LabPaths.of(args.name)
    info = LabInfo.load(paths)
    targets: list[tuple[str, str, str]] = []
    for source in args.filename or []:
        targets += [(o["kind"], (o.get("metadata") or {}).get("namespace") or args.namespace, o["metadata"]["name"])
                    for o in _objects_from(source)]
    if args.kind:
        wanted = args.kind.lower()
        kind = SHORT_NAMES.get(wanted) or next(
            (k for k in control.RESOURCES if wanted in (k.lower(), control.resource(k), k.lower() + "s")), None)
        if kind is None:
            raise LabError(f"unknown kind {args.kind!r}: one of {', '.join(control.RESOURCES)}")
        for ref in args.objects:
            namespace, _, name = ref.rpartition("/")
            targets.append((kind, namespace or args.namespace, name))
    if not targets:
        raise LabError("nothing to delete: give KIND NAME... or -f FILE")
    if any(kind == "Pod" for kind, _namespace, _name in targets):
        raise LabError("the lab's pods stay while the lab is up (a network namespace each): change one with "
                       "`ambit lab apply -f` of a Pod, or its labels with `ambit lab label pod`")
    with control.edit(info, paths) as state:
        for kind, namespace, name in targets:
            state.remove(kind, namespace, name)
            print(f'{control.resource(kind)} "{name}" deleted')
    return 0


def cmd_agent(args: argparse.Namespace) -> int:
    paths = LabPaths.of(args.name)
    info = LabInfo.load(paths)
    nodes = control.node_names(info, args.node)
    if args.action in ("stop", "restart"):
        for line in control.stop_agents(paths, nodes, kill=args.kill, timeout=args.stop_timeout):
            print(line)
    if args.action in ("start", "restart"):
        if args.kill and args.action == "start":
            raise LabError("--kill only goes with stop or restart")
        control.start_agents(info, paths, nodes, args.timeout, say=_say)
    return 0


# -- parsing -----------------------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    default_name = os.environ.get("AMBIT_LAB") or rt.DEFAULT_NAME
    top = argparse.ArgumentParser(prog="ambit lab", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    top.add_argument("--name", default=default_name, help=f"lab name (default {default_name!r})")
    # Accept --name after the subcommand too; SUPPRESS keeps a subparser from overwriting the top-level value.
    named = argparse.ArgumentParser(add_help=False)
    named.add_argument("--name", default=argparse.SUPPRESS, help="lab name")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("up", parents=[named], help="build a lab, start its CA and agents, return")
    p.add_argument("--nodes", type=int, default=2, help="number of nodes (default 2)")
    p.add_argument("--pods", type=int, default=2, help="pods per node (default 2)")
    p.add_argument("--namespaces", default="default",
                   help="comma-separated namespaces; pod k of a node goes to the ((k-1) mod n)-th (default: default)")
    p.add_argument("--no-agents", action="store_true", help="topology, state and CA only")
    p.add_argument("--fail-open", action="store_true", help="start the agents with --fail-open")
    p.add_argument("--observer-tls", action="store_true",
                   help="the agents also serve the Observer on <node IP>:4244, to the operator's certificate only "
                        "(written to the lab's operator/ directory); without it, on unix sockets only")
    p.add_argument("--dual-stack", action="store_true",
                   help="IPv6 too: every node and pod gets an IPv6 address (fd00:192:168::/64, fd00:200:<node>::/64) "
                        "beside its IPv4 one, and status.podIPs lists both; Services may be dual-stack or IPv6 "
                        "(ipFamilyPolicy, ipFamilies: cluster IPs from fd00:96::/112)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the agents' ready line")
    p.set_defaults(run=cmd_up)

    p = sub.add_parser("down", parents=[named], help="remove everything a lab made")
    p.add_argument("--timeout", type=float, default=control.STOP_TIMEOUT,
                   help="seconds between SIGTERM and SIGKILL (default %(default)s)")
    p.set_defaults(run=cmd_down)

    p = sub.add_parser("status", parents=[named], help="nodes, pods, processes and logs of a lab")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=cmd_status)

    p = sub.add_parser("exec", parents=[named], help="run a command in a pod's or node's network namespace",
                       usage="ambit lab exec [--name LAB] POD|NS/POD|NODE -- CMD...")
    p.add_argument("target", help="pod (NAME or NAMESPACE/NAME) or node (node-<i>)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    p.set_defaults(run=cmd_exec)

    p = sub.add_parser("label", parents=[named], help="set (key=value) or remove (key-) labels, like kubectl label")
    p.add_argument("kind", help="namespace or pod")
    p.add_argument("object", help="namespace name, or NAMESPACE/POD (POD alone: in --namespace)")
    p.add_argument("labels", nargs="+", metavar="key=value|key-")
    p.add_argument("-n", "--namespace", default="default", help="namespace of a pod given without one")
    p.add_argument("--overwrite", action="store_true", help="allow changing the value of an existing label")
    p.set_defaults(run=cmd_label)

    p = sub.add_parser("apply", parents=[named], help="create or replace objects from YAML, like kubectl apply -f")
    p.add_argument("-f", "--filename", action="append", required=True, help="YAML file (- for stdin); repeatable")
    p.add_argument("-n", "--namespace", default="default", help="namespace of objects that name none")
    p.set_defaults(run=cmd_apply)

    p = sub.add_parser("delete", parents=[named], help="delete objects, like kubectl delete")
    p.add_argument("kind", nargs="?", help="service (svc), endpointslice, authorizationpolicy, peerauthentication or "
                                           "namespace")
    p.add_argument("objects", nargs="*", metavar="NAME|NS/NAME")
    p.add_argument("-f", "--filename", action="append", help="delete the objects of a YAML file")
    p.add_argument("-n", "--namespace", default="default", help="namespace of names given without one")
    p.set_defaults(run=cmd_delete)

    p = sub.add_parser("agent", parents=[named], help="start, stop or restart node agents")
    p.add_argument("action", choices=["start", "stop", "restart"])
    p.add_argument("node", help="node-<i>, <i>, or all")
    p.add_argument("--kill", action="store_true", help="stop with SIGKILL (eBPF programs stay: fail-closed tests)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the ready line")
    p.add_argument("--stop-timeout", type=float, default=control.STOP_TIMEOUT,
                   help="seconds between SIGTERM and SIGKILL")
    p.set_defaults(run=cmd_agent)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        rt.check_name(args.name)
        result: int = args.run(args)
        return result
    except st.NotFound as e:
        print(f"Error from server (NotFound): {e}", file=sys.stderr)
    except (LabError, st.StateError) as e:
        print(f"error: {e}", file=sys.stderr)
        for note in getattr(e, "__notes__", []):
            print(note, file=sys.stderr)
    except BrokenPipeError:  # `ambit lab status | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:
        hint = " (the lab needs root)" if isinstance(e, PermissionError) else ""
        print(f"error: {e}{hint}", file=sys.stderr)
    except KeyboardInterrupt as e:
        print("interrupted", file=sys.stderr)
        for note in getattr(e, "__notes__", []):
            print(note, file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
