"""``make demo``: a two-node lab, a Service called by name before and after enrolling its namespace, and the wire.

Everything is real: nodes and pods are network namespaces, the agents load eBPF through bcc, identities
come from Ambit's CA over gRPC, the tunnel is HTTP/2 CONNECT over mutual TLS 1.3. The server pod is behind
the Service ``web`` (a cluster IP, port 80 -> 8080) and the client calls ``web:80`` by name. A packet capture
on node-1's uplink shows what crosses between the nodes: first (the lab's kube-proxy having sent the VIP to
the server pod) the app's own port with its bytes readable, then (the agent having picked the endpoint) only
TLS to port 15008, with the app's bytes nowhere on the wire.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from agent.capture import netns
from agent.cli import observe as observe_cli
from agent.lab import control
from agent.lab.runtime import LabError, LabInfo, LabPaths, PodInfo, python
from agent.mesh.store import AMBIENT, DATAPLANE_MODE

LAB = "demo"
PORT = 8080
SERVICE, SERVICE_PORT = "web", 80
SERVER = f"""
import socket
s = socket.create_server(("0.0.0.0", {PORT}))
while True:
    c, (ip, port) = s.accept()
    data = b""
    while chunk := c.recv(65536):
        data += chunk
    c.sendall(f"hello {{ip}}, I got {{len(data)}} bytes".encode())
    c.close()
"""
CLIENT = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.sendall(sys.argv[3].encode() * 2048)
s.shutdown(socket.SHUT_WR)
print(s.recv(200).decode())
"""


def say(step: str, text: str) -> None:
    print(f"[{step:>5}] {text}", flush=True)


def _exchange(client: PodInfo, marker: str) -> str:
    """The client calls the Service by name (``ip netns exec`` gives the pod its hosts file)."""
    result = netns.run(client.netns, [python(), "-c", CLIENT, SERVICE, str(SERVICE_PORT), marker],
                       capture_output=True, timeout=30, check=False)
    return result.stdout.strip() or f"failed: {result.stderr.strip().splitlines()[-1][-300:]}"


def _captured(info: LabInfo, client: PodInfo, server: PodInfo, marker: str, pcap: Path) -> str:
    """Send while capturing on node-1's uplink; summarise what crossed between the two pods."""
    node = info.node(client.node)
    cap = netns.popen(node.netns, ["tshark", "-q", "-i", node.uplink, "-f",
                                   f"tcp and host {client.ip} and host {server.ip}", "-w", str(pcap)],
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while not pcap.exists() and time.monotonic() < deadline:  # the file appears once capture started
            time.sleep(0.1)
        reply = _exchange(client, marker)
        time.sleep(0.5)
    finally:
        cap.terminate()
        cap.wait(10)
    fields = subprocess.run(["tshark", "-r", str(pcap), "-d", "tcp.port==15008,tls", "-T", "fields",
                             "-e", "tcp.srcport", "-e", "tcp.dstport", "-e", "_ws.col.Protocol"],
                            capture_output=True, text=True, timeout=30, check=False).stdout.split("\n")
    seen = Counter(tuple(line.split("\t")) for line in fields if line.strip())
    ports = sorted({p for (src, dst, _proto) in seen for p in (src, dst) if p in (str(PORT), "15008")})
    protos = sorted({proto for (_s, _d, proto) in seen})
    leaked = marker.encode() in pcap.read_bytes()
    say("wire", f"{sum(seen.values())} packets between the pods, server port(s) {', '.join(ports) or '-'}, "
                f"protocols {', '.join(protos) or '-'}; app bytes readable on the wire: {'YES' if leaked else 'no'}")
    say("app", f"{client.key} -> {SERVICE}:{SERVICE_PORT} answered: {reply!r}")
    return reply


def _enroll(info: LabInfo, paths: LabPaths, namespace: str) -> None:
    with control.edit(info, paths) as state:
        state.label("Namespace", "", namespace, [(DATAPLANE_MODE, AMBIENT)], overwrite=True)


def _service(info: LabInfo, paths: LabPaths, server: PodInfo) -> str:
    """``ambit lab apply`` of the Service in front of the server pod; its cluster IP."""
    obj: dict[str, Any] = {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": SERVICE, "namespace": server.namespace},
        "spec": {"selector": {"app": server.name}, "ports": [{"port": SERVICE_PORT, "targetPort": PORT}]}}
    control.apply(info, paths, [obj])
    return str(obj["spec"]["clusterIP"])


def run() -> int:
    if os.geteuid() != 0:
        print("make demo builds network namespaces and loads eBPF: run it as root (or with sudo)", file=sys.stderr)
        return 1
    if shutil.which("tshark") is None:
        print("make demo needs tshark (apt-get install tshark; make setup does it)", file=sys.stderr)
        return 1
    control.down(LAB)  # a demo interrupted earlier leaves nothing in the way
    say("lab", "building 2 nodes with 1 pod each, Ambit's CA, and one agent per node ...")
    try:
        info = control.up(LAB, nodes=2, pods=1)
    except LabError as e:
        print(f"lab did not come up: {e}", file=sys.stderr)
        return 1
    paths = LabPaths.of(LAB)
    try:
        client, server = info.pods[0], info.pods[1]
        for pod in info.pods:
            say("lab", f"pod {pod.key} ({pod.ip}) on {pod.node}, service account {pod.service_account}")
        app = netns.popen(server.netns, [python(), "-c", SERVER])
        vip = _service(info, paths, server)
        fqdn = f"{SERVICE}.{server.namespace}.svc.cluster.local"
        say("lab", f"Service {server.namespace}/{SERVICE}: cluster IP {vip}, port {SERVICE_PORT} -> "
                   f"{server.name}:{PORT}; pods resolve {SERVICE}, {SERVICE}.{server.namespace} and {fqdn}")
        time.sleep(0.5)
        with tempfile.TemporaryDirectory(prefix="ambit-demo-") as tmp:
            say("step", f"1. namespace {client.namespace!r} not enrolled: the agents leave its traffic alone, "
                        "the node's kube-proxy sends the VIP to the server pod")
            _captured(info, client, server, secrets.token_hex(8), Path(tmp, "plain.pcap"))
            say("step", f"2. ambit lab label namespace {client.namespace} {DATAPLANE_MODE}={AMBIENT} (no pod restart): "
                        "the client's agent picks the endpoint and tunnels to it")
            _enroll(info, paths, client.namespace)
            time.sleep(1.0)
            reply = _captured(info, client, server, secrets.token_hex(8), Path(tmp, "mesh.pcap"))
            say("step", f"the server still sees the client pod's own address: {'yes' if client.ip in reply else 'NO'}")
            say("step", f"3. ambit observe --lab {LAB} --last 8: what both agents recorded (Hubble-style flows)")
            sys.stdout.flush()
            observe_cli.main(["--lab", LAB, "--last", "8", "--from-ip", client.ip])
            app.terminate()
            app.wait(5)
        return 0
    finally:
        say("lab", "down: removing namespaces, programs, processes and files")
        control.down(LAB)


if __name__ == "__main__":
    sys.exit(run())
