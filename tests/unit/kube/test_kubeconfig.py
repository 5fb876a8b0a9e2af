"""Kubeconfig files read as kubectl reads them: merging, contexts, relative paths, ``-data`` fields, in-cluster
config, and every bad configuration named by file, entry and field (agent/kube/kubeconfig.py)."""

from __future__ import annotations

import base64
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.kube.kubeconfig import KubeConfigError, in_cluster, kubeconfig_files, load_kubeconfig
from tests.fixtures.kube_fake import FakeCa

Doc = dict[str, Any]


@pytest.fixture(scope="module")
def ca() -> FakeCa:
    return FakeCa()


@pytest.fixture(scope="module")
def pair(ca: FakeCa) -> tuple[bytes, bytes]:
    return ca.issue("alice")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def config(clusters: dict[str, Doc] | None = None, users: dict[str, Doc] | None = None,
           contexts: dict[str, Doc] | None = None, current: str | None = None) -> Doc:
    doc: Doc = {"apiVersion": "v1", "kind": "Config"}
    for section, inner, items in (("clusters", "cluster", clusters), ("users", "user", users),
                                  ("contexts", "context", contexts)):
        if items is not None:
            doc[section] = [{"name": name, inner: body} for name, body in items.items()]
    if current is not None:
        doc["current-context"] = current
    return doc


def write(path: Path, doc: Doc | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return path


def simple(cluster: Doc | None = None, user: Doc | None = None) -> Doc:
    return config({"c": cluster if cluster is not None else {"server": "https://10.0.0.1:6443"}},
                  {"u": user if user is not None else {"token": "t"}},
                  {"ctx": {"cluster": "c", "user": "u"}}, current="ctx")


def test_a_kubeconfig_with_ca_data_and_a_token(tmp_path: Path, ca: FakeCa) -> None:
    path = write(tmp_path / "config", simple({"server": "https://api.example:6443/prefix/",
                                              "certificate-authority-data": b64(ca.pem), "tls-server-name": "kube"},
                                             {"token": "secret"}))
    access = load_kubeconfig([path])
    assert access.server == "https://api.example:6443/prefix"  # a path prefix is kept, the trailing slash not
    assert access.ca_pem == ca.pem and access.tls_server_name == "kube" and not access.insecure
    assert access.user.token == "secret" and access.user.cert_pem is None
    assert access.origin == str(path)
    assert access.user.where == f"kubeconfig {path}: user 'u'"


def test_client_certificate_files_relative_to_the_kubeconfig(tmp_path: Path, ca: FakeCa,
                                                             pair: tuple[bytes, bytes]) -> None:
    (tmp_path / "pki").mkdir()
    (tmp_path / "pki" / "ca.crt").write_bytes(ca.pem)
    (tmp_path / "pki" / "alice.crt").write_bytes(pair[0])
    (tmp_path / "pki" / "alice.key").write_bytes(pair[1])
    (tmp_path / "pki" / "token").write_text("from-file\n")
    path = write(tmp_path / "config", simple({"server": "10.0.0.1:6443", "certificate-authority": "pki/ca.crt"},
                                             {"client-certificate": "pki/alice.crt", "client-key": "pki/alice.key",
                                              "tokenFile": "pki/token"}))
    access = load_kubeconfig([path])
    assert access.server == "https://10.0.0.1:6443"  # a bare host:port is https, as in client-go
    assert (access.ca_pem, access.user.cert_pem, access.user.key_pem) == (ca.pem, *pair)
    assert access.user.token_file == tmp_path / "pki" / "token"


def test_data_fields_win_over_file_fields(tmp_path: Path, ca: FakeCa, pair: tuple[bytes, bytes]) -> None:
    path = write(tmp_path / "config", simple(
        {"server": "https://k", "certificate-authority": "missing.crt", "certificate-authority-data": b64(ca.pem)},
        {"client-certificate": "missing.crt", "client-certificate-data": b64(pair[0]),
         "client-key": "missing.key", "client-key-data": b64(pair[1])}))
    access = load_kubeconfig([path])
    assert (access.ca_pem, access.user.cert_pem, access.user.key_pem) == (ca.pem, *pair)


def test_several_files_merge_as_kubectl_merges_them(tmp_path: Path) -> None:
    first = write(tmp_path / "a" / "config", config(
        {"shared": {"server": "https://first"}}, {}, {"one": {"cluster": "shared", "user": "bob"}}, current="one"))
    second = write(tmp_path / "b" / "config", config(
        {"shared": {"server": "https://second"}, "other": {"server": "https://other"}},
        {"bob": {"tokenFile": "bob.token"}},
        {"one": {"cluster": "other", "user": "bob"}, "two": {"cluster": "other", "user": "bob"}}, current="two"))
    access = load_kubeconfig([first, second])
    # current-context: the first file that sets it; each name: the first file that defines it.
    assert access.server == "https://first"
    assert access.user.token_file == tmp_path / "b" / "bob.token"  # relative to the file that defined the user
    assert access.origin == f"{first}{os.pathsep}{second}"
    assert load_kubeconfig([first, second], context="two").server == "https://other"
    assert load_kubeconfig([second, first]).server == "https://other"  # order decides


def test_kubeconfig_variable_lists_files_missing_ones_skipped(tmp_path: Path) -> None:
    a, b = write(tmp_path / "a", simple()), write(tmp_path / "b", simple())
    listed = os.pathsep.join([str(tmp_path / "missing"), str(a), "", str(b), str(a)])
    assert kubeconfig_files(None, {"KUBECONFIG": listed}) == [a, b]
    assert kubeconfig_files(b, {"KUBECONFIG": str(a)}) == [b]  # an explicit file is read alone
    with pytest.raises(KubeConfigError, match=r"no kubeconfig at .*missing"):
        kubeconfig_files(None, {"KUBECONFIG": str(tmp_path / "missing")})
    with pytest.raises(KubeConfigError, match=r"kubeconfig .*nope does not exist"):
        kubeconfig_files(tmp_path / "nope", {})


def test_no_user_is_anonymous_and_an_empty_file_merges_as_nothing(tmp_path: Path) -> None:
    empty = write(tmp_path / "empty", "")
    path = write(tmp_path / "config", config({"c": {"server": "http://127.0.0.1:8080"}}, None,
                                             {"ctx": {"cluster": "c"}}, current="ctx"))
    access = load_kubeconfig([empty, path])
    assert not access.https and access.user.token is None and access.user.exec is None


def test_exec_plugin_spec(tmp_path: Path) -> None:
    path = write(tmp_path / "config", simple(user={"exec": {
        "apiVersion": "client.authentication.k8s.io/v1", "command": "bin/plugin", "args": ["get", "--x"],
        "env": [{"name": "A", "value": "1"}], "interactiveMode": "Never", "provideClusterInfo": True,
        "installHint": "install it"}}))
    spec = load_kubeconfig([path]).user.exec
    assert spec is not None
    assert spec.command == str(tmp_path / "bin" / "plugin")  # a path: relative to the kubeconfig
    assert (spec.args, spec.env, spec.interactive_mode, spec.provide_cluster_info) == (
        ("get", "--x"), (("A", "1"),), "Never", True)
    on_path = write(tmp_path / "config2", simple(user={"exec": {
        "apiVersion": "client.authentication.k8s.io/v1beta1", "command": "gke-gcloud-auth-plugin"}}))
    spec = load_kubeconfig([on_path]).user.exec
    assert spec is not None and spec.command == "gke-gcloud-auth-plugin" and spec.interactive_mode == "IfAvailable"


def test_in_cluster(tmp_path: Path, ca: FakeCa) -> None:
    (tmp_path / "ca.crt").write_bytes(ca.pem)
    (tmp_path / "token").write_text("t")
    access = in_cluster(tmp_path, {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"})
    assert access.server == "https://[fd00::1]:443" and access.ca_pem == ca.pem
    assert access.user.token_file == tmp_path / "token" and access.origin == "in-cluster"
    with pytest.raises(KubeConfigError, match="KUBERNETES_SERVICE_PORT must both be set"):
        in_cluster(tmp_path, {"KUBERNETES_SERVICE_HOST": "10.96.0.1"})
    (tmp_path / "ca.crt").write_text("garbage")
    with pytest.raises(KubeConfigError, match=r"in-cluster config .*: ca.crt: not a PEM certificate bundle"):
        in_cluster(tmp_path, {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"})
    (tmp_path / "ca.crt").unlink()
    with pytest.raises(KubeConfigError, match=r"in-cluster config .*: ca.crt: No such file"):
        in_cluster(tmp_path, {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"})


def encrypted_key() -> bytes:
    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pass"))


def _user(**fields: Any) -> Callable[[FakeCa, tuple[bytes, bytes]], Doc | str]:
    return lambda ca, pair: simple(user=fields)


def _cluster(**fields: Any) -> Callable[[FakeCa, tuple[bytes, bytes]], Doc | str]:
    return lambda ca, pair: simple(cluster={"server": "https://k", **fields})


EXEC = {"apiVersion": "client.authentication.k8s.io/v1", "command": "p", "interactiveMode": "Never"}
BAD: dict[str, tuple[Callable[[FakeCa, tuple[bytes, bytes]], Doc | str], str]] = {
    "not yaml": (lambda ca, pair: "clusters: [", "not valid YAML"),
    "not a mapping": (lambda ca, pair: "- a\n- b\n", "not a kubeconfig"),
    "clusters not a list": (lambda ca, pair: {"clusters": {"c": {}}}, "clusters must be a list"),
    "entry without a name": (lambda ca, pair: {"users": [{"user": {}}]}, r"users\[0\] has no name"),
    "no current context": (lambda ca, pair: config({}, {}, {}), "no current-context is set"),
    "undefined context": (lambda ca, pair: config({}, {}, {}, current="x"), "context 'x' .* is not defined"),
    "undefined cluster": (lambda ca, pair: config({}, {}, {"x": {"cluster": "c"}}, current="x"),
                          "context 'x': cluster 'c' is not defined"),
    "undefined user": (lambda ca, pair: config({"c": {"server": "https://k"}}, {},
                                               {"x": {"cluster": "c", "user": "u"}}, current="x"),
                       "context 'x': user 'u' is not defined"),
    "no server": (_cluster(server=""), "cluster 'c': server is not set"),
    "server scheme": (_cluster(server="ftp://k"), "cluster 'c': server 'ftp://k' must be an http"),
    "server not a string": (_cluster(server=6443), "cluster 'c': server must be a string"),
    "insecure not a bool": (_cluster(**{"insecure-skip-tls-verify": "yes"}),
                            "cluster 'c': insecure-skip-tls-verify must be true or false"),
    "ca data not base64": (_cluster(**{"certificate-authority-data": "!!!"}),
                           "cluster 'c': certificate-authority-data is not valid base64"),
    "ca file missing": (_cluster(**{"certificate-authority": "/nonexistent/ca.crt"}),
                        "cluster 'c': certificate-authority /nonexistent/ca.crt: No such file"),
    "ca not pem": (_cluster(**{"certificate-authority-data": b64(b"not a certificate")}),
                   "cluster 'c': certificate-authority-data: not a PEM certificate bundle"),
    "insecure with a ca": (lambda ca, pair: simple({"server": "https://k", "insecure-skip-tls-verify": True,
                                                    "certificate-authority-data": b64(ca.pem)}),
                           "cluster 'c': insecure-skip-tls-verify and a certificate-authority exclude each other"),
    "proxy url": (_cluster(**{"proxy-url": "socks5://p:1080"}), "cluster 'c': proxy-url is not supported"),
    "token not a string": (_user(token=123), "user 'u': token must be a string"),
    "certificate without key": (lambda ca, pair: simple(user={"client-certificate-data": b64(pair[0])}),
                                "user 'u': client-certificate is set but client-key is not"),
    "key without certificate": (lambda ca, pair: simple(user={"client-key-data": b64(pair[1])}),
                                "user 'u': client-key is set but client-certificate is not"),
    "key of another certificate": (lambda ca, pair: simple(user={"client-certificate-data": b64(pair[0]),
                                                                 "client-key-data": b64(ca.issue("x")[1])}),
                                   "user 'u': client-certificate-data, client-key-data: not a PEM certificate and "
                                   r"its key \(KEY_VALUES_MISMATCH\)"),
    "garbage key": (lambda ca, pair: simple(user={"client-certificate-data": b64(pair[0]),
                                                  "client-key-data": b64(b"garbage")}),
                    "user 'u': client-certificate-data, client-key-data: not a PEM certificate and its key"),
    "encrypted key": (lambda ca, pair: simple(user={"client-certificate-data": b64(pair[0]),
                                                    "client-key-data": b64(encrypted_key())}),
                      "user 'u': .*the key is encrypted"),
    "basic and token": (_user(username="a", password="b", token="t"),
                        "user 'u': username/password and a token exclude each other"),
    "auth provider": (_user(**{"auth-provider": {"name": "oidc"}}), "user 'u': auth-provider is not supported"),
    "impersonation": (_user(**{"as": "admin"}), r"user 'u': impersonation \(as\) is not supported"),
    "exec without command": (_user(exec={**EXEC, "command": ""}), "user 'u': exec: command is not set"),
    "exec alpha": (_user(exec={**EXEC, "apiVersion": "client.authentication.k8s.io/v1alpha1"}),
                   "user 'u': exec: apiVersion 'client.authentication.k8s.io/v1alpha1' is not one of"),
    "exec v1 without interactive mode": (_user(exec={k: v for k, v in EXEC.items() if k != "interactiveMode"}),
                                         "user 'u': exec: interactiveMode must be set"),
    "exec bad interactive mode": (_user(exec={**EXEC, "interactiveMode": "Sometimes"}),
                                  "user 'u': exec: interactiveMode 'Sometimes' is not one of"),
    "exec bad args": (_user(exec={**EXEC, "args": "--x"}), "user 'u': exec: args must be a list of strings"),
    "exec bad env": (_user(exec={**EXEC, "env": [{"name": "A"}]}),
                     r"user 'u': exec: env\[0\] must have a string name and value"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_kubeconfigs_are_named_by_file_entry_and_field(case: str, tmp_path: Path, ca: FakeCa,
                                                            pair: tuple[bytes, bytes]) -> None:
    make, message = BAD[case]
    path = write(tmp_path / "config", make(ca, pair))
    with pytest.raises(KubeConfigError, match=f"^kubeconfig {path}: .*{message}") as error:
        load_kubeconfig([path])
    assert "Traceback" not in str(error.value)
