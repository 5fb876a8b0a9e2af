"""Issue 16's proof for the Observer, on a real lab (``ambit lab up --observer-tls``): from a pod, an agent's
Observer port refuses every client without the operator's certificate (plaintext, TLS without a certificate, a
mesh workload's certificate) and answers the same pod holding it; ``ambit observe`` works on the node (its unix
socket) and from another machine with the operator's certificate (here node-2's namespace dialling node-1's
and its own address), and says what is missing without it."""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.ca.authority import CertificateAuthority
from agent.capture import netns
from agent.lab import control
from agent.lab import runtime as rt
from agent.lab.runtime import LabInfo, LabPaths
from hbone.identity import SpiffeId

PROJECT = Path(__file__).resolve().parents[2]
TIMEOUT = 60.0


def _bcc_usable() -> bool:
    return importlib.util.find_spec("bcc") is not None and Path(f"/lib/modules/{os.uname().release}/build").exists()


pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, eBPF)"),
    pytest.mark.skipif(os.geteuid() == 0 and not _bcc_usable(), reason="the agent needs bcc and kernel headers"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="needs ip"),
    pytest.mark.timeout(240),
]

# Run inside a pod's namespace: ServerStatus on each target with each credential; prints {case: outcome}.
PROBE = r"""
import json, sys, grpc
from agent.telemetry import observer_pb2 as pb, observer_pb2_grpc as pbg
target, ca, cert, key, op_cert, op_key = sys.argv[1:7]
read = lambda p: open(p, "rb").read()
cases = {
    "plaintext": None,
    "tls without a certificate": grpc.ssl_channel_credentials(read(ca)),
    "a workload's certificate": grpc.ssl_channel_credentials(read(ca), read(key), read(cert)),
    "the operator's certificate": grpc.ssl_channel_credentials(read(ca), read(op_key), read(op_cert)),
}
out = {}
for case, creds in cases.items():
    opts = [("grpc.ssl_target_name_override", "observer.ambit.internal")]
    ch = grpc.insecure_channel(target) if creds is None else grpc.secure_channel(target, creds, options=opts)
    try:
        out[case] = pbg.ObserverStub(ch).ServerStatus(pb.ServerStatusRequest(), timeout=5).node_name
    except grpc.RpcError as e:
        out[case] = e.code().name
    finally:
        ch.close()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def lab() -> Iterator[tuple[LabInfo, LabPaths]]:
    name = f"obstls-{secrets.token_hex(3)}"
    try:
        info = control.up(name, nodes=2, pods=1, timeout=120, observer_tls=True)
        yield info, LabPaths.of(name)
    finally:
        control.down(name, timeout=5)
        left = [n for n in netns.list_netns() if n.startswith(rt.netns_prefix(name))]
        assert not left and not LabPaths.of(name).root.exists(), f"lab {name} left {left}"


def in_netns(ns: str, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(PROJECT)}
    return subprocess.run(netns.netns_argv(ns, [sys.executable, *argv]), cwd=PROJECT, env=env, text=True,
                          capture_output=True, timeout=TIMEOUT, check=False)


def test_a_pod_is_refused_without_the_operator_certificate(lab: tuple[LabInfo, LabPaths], tmp_path: Path) -> None:
    info, paths = lab
    node1 = info.nodes[0]
    pod = next(p for p in info.pods if p.node == info.nodes[1].name)  # from another node's pod, across the wire
    workload = CertificateAuthority.load(paths.ca_dir, info.trust_domain).issue(
        SpiffeId(info.trust_domain, pod.namespace, pod.service_account))
    (tmp_path / "w.crt").write_bytes(workload.chain_pem)
    (tmp_path / "w.key").write_bytes(workload.key_pem)
    for p in info.pods:  # a pod of node-1 (the Observer's own node) and one of node-2
        out = in_netns(p.netns, "-c", PROBE, f"{node1.ip}:{rt.OBSERVER_PORT}", str(paths.trust_bundle),
                       str(tmp_path / "w.crt"), str(tmp_path / "w.key"), str(paths.operator / "tls.crt"),
                       str(paths.operator / "tls.key"))
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == {"plaintext": "UNAVAILABLE", "tls without a certificate": "UNAVAILABLE",
                                          "a workload's certificate": "PERMISSION_DENIED",
                                          "the operator's certificate": node1.name}, p.key  # (reachable: served)


def test_ambit_observe_on_the_node_and_with_the_operator_certificate(lab: tuple[LabInfo, LabPaths]) -> None:
    info, paths = lab
    on_node = in_netns(info.nodes[0].netns, "-m", "agent.cli", "observe", "--lab", info.name, "--all", "-o", "json")
    assert (on_node.returncode, on_node.stderr) == (0, "")
    op = paths.operator
    tls = ["--tls-client-cert-file", str(op / "tls.crt"), "--tls-client-key-file", str(op / "tls.key"),
           "--tls-ca-cert-files", str(op / "ca.crt")]
    servers = [a for n in info.nodes for a in ("--server", f"{n.ip}:{rt.OBSERVER_PORT}")]
    remote = in_netns(info.nodes[1].netns, "-m", "agent.cli", "observe", *servers, *tls, "--all", "-o", "json")
    assert (remote.returncode, remote.stderr) == (0, "")
    without = in_netns(info.nodes[1].netns, "-m", "agent.cli", "observe", *servers, "--all")
    assert without.returncode == 2 and "serves mutual TLS only" in without.stderr
