"""The lab's agents serve the Observer on their unix socket only, unless the lab is made with observer_tls:
then also on the node's address, with the certificate the lab's CA issued (and the agent accepts the line)."""

from __future__ import annotations

from pathlib import Path

from agent import __main__ as agent_main
from agent.ca.authority import CertificateAuthority
from agent.lab.control import agent_argv, issue_observer_certificates
from agent.lab.runtime import LabInfo, LabPaths, NodeInfo
from agent.telemetry.observer_tls import ServerTlsFiles


def lab(tmp_path: Path, observer_tls: bool) -> tuple[LabInfo, LabPaths, NodeInfo]:
    paths = LabPaths(tmp_path / "lab")
    node = NodeInfo("node-1", 0, "lab.n1", "10.99.0.1", "eth0", "10.99.1.0/24")
    info = LabInfo(name="lab", prefix="lab.", nodes=[node], ca_address="10.99.0.1:15012", observer_tls=observer_tls)
    paths.root.mkdir()
    paths.ca_dir.mkdir(mode=0o700)
    CertificateAuthority.create(info.trust_domain).save(paths.ca_dir)
    return info, paths, node


def test_by_default_the_unix_socket_only(tmp_path: Path) -> None:
    info, paths, node = lab(tmp_path, observer_tls=False)
    argv = agent_argv(info, paths, node)
    assert not [a for a in argv if a.startswith("--observer-") and a != "--observer-socket"]
    args = agent_main.parse_args(argv[3:])
    assert args.observer_listen is None and args.observer_tls is None


def test_with_observer_tls_the_node_address_and_the_issued_certificate(tmp_path: Path) -> None:
    info, paths, node = lab(tmp_path, observer_tls=True)
    issue_observer_certificates(info, paths)
    args = agent_main.parse_args(agent_argv(info, paths, node)[3:])  # the files exist and belong together
    assert args.observer_listen == "10.99.0.1:4244"
    assert args.observer_tls == ServerTlsFiles(paths.observer_tls / "tls.crt", paths.observer_tls / "tls.key",
                                               (paths.trust_bundle,))
    assert sorted(p.name for p in paths.operator.iterdir()) == ["ca.crt", "tls.crt", "tls.key"]
