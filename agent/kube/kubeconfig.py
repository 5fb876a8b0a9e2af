"""Where the API server is and how to authenticate to it: in-cluster service account, or kubeconfig files.

Kubeconfig files are read as kubectl reads them: ``$KUBECONFIG`` may list several files (``os.pathsep``-separated;
missing ones are skipped) which are merged entry by entry, the first file to define a cluster, user or context
name winning, and the first to set ``current-context`` naming the context; relative paths in an entry are
relative to the file that defined it. An explicit file (``--kubeconfig``) is read alone.

Supported: a cluster's ``server``, ``certificate-authority`` / ``-data``, ``insecure-skip-tls-verify``,
``tls-server-name`` and the ``client.authentication.k8s.io/exec`` extension; a user's ``token``, ``tokenFile``,
``client-certificate`` / ``-data``, ``client-key`` / ``-data``, ``username``/``password`` and ``exec`` credential
plugins (``client.authentication.k8s.io/v1`` and ``v1beta1``). Rejected with an error rather than ignored, since
ignoring them would connect differently from what the file says: ``auth-provider`` (use an exec plugin, e.g.
kubelogin), ``proxy-url`` and impersonation (``as``...). Everything else in the file is ignored, as kubectl does.

Every problem is a ``KubeConfigError`` naming the file, the entry and the field. Nothing here talks to the network.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.kube.tls import TlsMaterialError, client_context

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
DEFAULT_KUBECONFIG = "~/.kube/config"
EXEC_API_VERSIONS = ("client.authentication.k8s.io/v1", "client.authentication.k8s.io/v1beta1")
EXEC_EXTENSION = "client.authentication.k8s.io/exec"  # a cluster's extension handed to exec plugins
INTERACTIVE_MODES = ("Never", "IfAvailable", "Always")
_REJECTED = {"auth-provider": "auth-provider is not supported: use an exec credential plugin (e.g. kubelogin)",
             "as": "impersonation (as) is not supported", "as-uid": "impersonation (as-uid) is not supported",
             "as-groups": "impersonation (as-groups) is not supported",
             "as-user-extra": "impersonation (as-user-extra) is not supported"}


class KubeConfigError(Exception):
    """No usable way to reach the API server: the message names the file (or in-cluster), entry and field."""


@dataclass(frozen=True)
class ExecSpec:
    """A user's ``exec`` credential plugin, as the kubeconfig states it."""

    command: str  # resolved against the kubeconfig's directory when it contains a path separator
    args: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    api_version: str
    install_hint: str | None
    provide_cluster_info: bool
    interactive_mode: str


@dataclass(frozen=True)
class UserSpec:
    """How to authenticate; ``where`` names it in errors (``kubeconfig F: user "u"``)."""

    where: str
    token: str | None = None
    token_file: Path | None = None
    cert_pem: bytes | None = None
    key_pem: bytes | None = None
    username: str | None = None
    password: str | None = None
    exec: ExecSpec | None = None


@dataclass(frozen=True)
class ClusterAccess:
    """One API server and one user: everything a client needs."""

    origin: str  # "in-cluster" or the kubeconfig file(s), for logs
    server: str  # scheme://host[:port][/prefix], without a trailing slash
    ca_pem: bytes | None
    insecure: bool
    tls_server_name: str | None
    user: UserSpec
    exec_extension: Any = None  # the cluster's client.authentication.k8s.io/exec extension, for exec plugins

    @property
    def https(self) -> bool:
        return self.server.startswith("https://")


def in_cluster(service_account: Path, environ: Mapping[str, str]) -> ClusterAccess:
    """The pod's service account: ``KUBERNETES_SERVICE_HOST``/``_PORT``, ``ca.crt`` and the ``token`` file (which
    the client re-reads, since projected tokens rotate)."""
    host, port = environ.get("KUBERNETES_SERVICE_HOST", ""), environ.get("KUBERNETES_SERVICE_PORT", "")
    where = f"in-cluster config ({service_account})"
    if not host or not port:
        raise KubeConfigError(f"{where}: KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT must both be set")
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    try:
        ca_pem = (service_account / "ca.crt").read_bytes()
    except OSError as e:
        raise KubeConfigError(f"{where}: ca.crt: {e.strerror or e}") from None
    access = ClusterAccess("in-cluster", f"https://{host}:{port}", ca_pem, False, None,
                           UserSpec(where, token_file=service_account / "token"))
    _check_tls(access, f"{where}: ca.crt", "")
    return access


def kubeconfig_files(kubeconfig: Path | None, environ: Mapping[str, str]) -> list[Path]:
    """The files to read: ``kubeconfig`` alone, else those of ``$KUBECONFIG`` (or ``~/.kube/config``) that exist."""
    if kubeconfig is not None:
        if not kubeconfig.is_file():
            raise KubeConfigError(f"kubeconfig {kubeconfig} does not exist")
        return [kubeconfig]
    listed = environ.get("KUBECONFIG") or DEFAULT_KUBECONFIG
    files: list[Path] = []
    for entry in listed.split(os.pathsep):
        path = Path(entry).expanduser() if entry else None
        if path is not None and path not in files and path.is_file():
            files.append(path)
    if not files:
        raise KubeConfigError(f"not in a cluster (KUBERNETES_SERVICE_HOST unset) and no kubeconfig at {listed}")
    return files


@dataclass(frozen=True)
class _Entry:
    """A named cluster, user or context, and the file that defined it (first definition wins)."""

    name: str
    body: Mapping[str, Any]
    file: Path

    def where(self, kind: str) -> str:
        return f"kubeconfig {self.file}: {kind} {self.name!r}"


def load_kubeconfig(files: Sequence[Path], context: str | None = None) -> ClusterAccess:
    """The cluster and user of ``context`` (default: the merged ``current-context``) in ``files``, merged."""
    entries: dict[str, dict[str, _Entry]] = {"clusters": {}, "users": {}, "contexts": {}}
    current: tuple[str, Path] | None = None
    for file in files:
        document = _read(file)
        for section, merged in entries.items():
            for entry in _entries(document, section, file):
                merged.setdefault(entry.name, entry)
        chosen = document.get("current-context")
        if chosen is not None and not isinstance(chosen, str):
            raise KubeConfigError(f"kubeconfig {file}: current-context must be a string")
        if chosen and current is None:
            current = (chosen, file)
    origin = os.pathsep.join(str(f) for f in files)
    name = context or (current[0] if current else None)
    if not name:
        raise KubeConfigError(f"kubeconfig {origin}: no current-context is set and no context was given")
    ctx = entries["contexts"].get(name)
    if ctx is None:
        said = "given" if context else f"current-context of {current[1] if current else origin}"
        raise KubeConfigError(f"kubeconfig {origin}: context {name!r} ({said}) is not defined")
    cluster_name = _string(ctx.body, "cluster", ctx.where("context"))
    if not cluster_name:
        raise KubeConfigError(f"{ctx.where('context')}: names no cluster")
    cluster = entries["clusters"].get(cluster_name)
    if cluster is None:
        raise KubeConfigError(f"{ctx.where('context')}: cluster {cluster_name!r} is not defined")
    user_name = _string(ctx.body, "user", ctx.where("context"))
    user_entry = entries["users"].get(user_name) if user_name else None
    if user_name and user_entry is None:
        raise KubeConfigError(f"{ctx.where('context')}: user {user_name!r} is not defined")
    user = _user(user_entry) if user_entry is not None else UserSpec(f"{ctx.where('context')}: no user")
    access = _cluster(cluster, user, origin)
    _check_tls(access, f"{cluster.where('cluster')}: {_field(cluster, 'certificate-authority')}",
               f"{_field(user_entry, 'client-certificate')}, {_field(user_entry, 'client-key')}: "
               if user_entry is not None else "")
    return access


def _read(file: Path) -> Mapping[str, Any]:
    import yaml  # here: an agent in a pod (in-cluster credentials) reads no kubeconfig and needs no YAML (1 MiB)

    try:
        document = yaml.safe_load(file.read_bytes())
    except OSError as e:
        raise KubeConfigError(f"kubeconfig {file}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise KubeConfigError(f"kubeconfig {file}: not valid YAML: {e}") from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise KubeConfigError(f"kubeconfig {file}: not a kubeconfig (a YAML mapping with clusters, users, contexts)")
    return document


def _entries(document: Mapping[str, Any], section: str, file: Path) -> list[_Entry]:
    items = document.get(section)
    if items is None:
        return []
    if not isinstance(items, list):
        raise KubeConfigError(f"kubeconfig {file}: {section} must be a list")
    inner = section[:-1]  # clusters[i].cluster, users[i].user, contexts[i].context
    found = []
    for index, item in enumerate(items):
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str) or not name:
            raise KubeConfigError(f"kubeconfig {file}: {section}[{index}] has no name")
        body = item.get(inner)
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise KubeConfigError(f"kubeconfig {file}: {inner} {name!r}: {inner} must be a mapping")
        found.append(_Entry(name, body, file))
    return found


def _string(body: Mapping[str, Any], key: str, where: str) -> str | None:
    value = body.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise KubeConfigError(f"{where}: {key} must be a string")
    return value


def _flag(body: Mapping[str, Any], key: str, where: str) -> bool:
    value = body.get(key, False)
    if not isinstance(value, bool):
        raise KubeConfigError(f"{where}: {key} must be true or false")
    return value


def _path(entry: _Entry, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else entry.file.parent / path


def _field(entry: _Entry, key: str) -> str:
    """Which of ``key`` and ``key``-data the material came from."""
    return f"{key}-data" if entry.body.get(f"{key}-data") else key


def _material(entry: _Entry, key: str, kind: str) -> bytes | None:
    """``key``-data (base64, preferred, as kubectl does) or the file ``key`` names."""
    where = entry.where(kind)
    data = _string(entry.body, f"{key}-data", where)
    if data is not None:
        try:
            return base64.b64decode("".join(data.split()), validate=True)
        except (binascii.Error, ValueError):
            raise KubeConfigError(f"{where}: {key}-data is not valid base64") from None
    name = _string(entry.body, key, where)
    if name is None:
        return None
    try:
        return _path(entry, name).read_bytes()
    except OSError as e:
        raise KubeConfigError(f"{where}: {key} {_path(entry, name)}: {e.strerror or e}") from None


def _cluster(entry: _Entry, user: UserSpec, origin: str) -> ClusterAccess:
    where = entry.where("cluster")
    if entry.body.get("proxy-url"):
        raise KubeConfigError(f"{where}: proxy-url is not supported")
    server = _string(entry.body, "server", where)
    if not server:
        raise KubeConfigError(f"{where}: server is not set")
    if "://" not in server:
        server = f"https://{server}"  # as client-go: a bare host:port is https
    if not server.startswith(("https://", "http://")):
        raise KubeConfigError(f"{where}: server {server!r} must be an http:// or https:// URL")
    ca_pem = _material(entry, "certificate-authority", "cluster")
    insecure = _flag(entry.body, "insecure-skip-tls-verify", where)
    if insecure and ca_pem is not None:
        raise KubeConfigError(f"{where}: insecure-skip-tls-verify and a certificate-authority exclude each other "
                              "(as kubectl says)")
    return ClusterAccess(origin, server.rstrip("/"), ca_pem, insecure, _string(entry.body, "tls-server-name", where),
                         user, _exec_extension(entry))


def _exec_extension(entry: _Entry) -> Any:
    extensions = entry.body.get("extensions") or []
    if not isinstance(extensions, list):
        raise KubeConfigError(f"{entry.where('cluster')}: extensions must be a list")
    for extension in extensions:
        if isinstance(extension, dict) and extension.get("name") == EXEC_EXTENSION:
            return extension.get("extension")
    return None


def _user(entry: _Entry) -> UserSpec:
    where = entry.where("user")
    for field, reason in _REJECTED.items():
        if entry.body.get(field):
            raise KubeConfigError(f"{where}: {reason}")
    cert, key = _material(entry, "client-certificate", "user"), _material(entry, "client-key", "user")
    if (cert is None) != (key is None):
        have, missing = ("client-certificate", "client-key") if key is None else ("client-key", "client-certificate")
        raise KubeConfigError(f"{where}: {have} is set but {missing} is not")
    token, token_file = _string(entry.body, "token", where), _string(entry.body, "tokenFile", where)
    username, password = _string(entry.body, "username", where), _string(entry.body, "password", where)
    if username is not None and (token or token_file):
        raise KubeConfigError(f"{where}: username/password and a token exclude each other (as kubectl says)")
    exec_body = entry.body.get("exec")
    return UserSpec(where, token=token, token_file=_path(entry, token_file) if token_file else None, cert_pem=cert,
                    key_pem=key, username=username, password=password,
                    exec=_exec(entry, exec_body, f"{where}: exec") if exec_body else None)


def _exec(entry: _Entry, body: Any, where: str) -> ExecSpec:
    if not isinstance(body, dict):
        raise KubeConfigError(f"{where} must be a mapping")
    command = _string(body, "command", where)
    if not command:
        raise KubeConfigError(f"{where}: command is not set")
    if os.sep in command:  # a path (not a name looked up in $PATH): relative to the kubeconfig, as kubectl does
        command = str(_path(entry, command))
    api_version = _string(body, "apiVersion", where)
    if api_version not in EXEC_API_VERSIONS:
        raise KubeConfigError(f"{where}: apiVersion {api_version!r} is not one of {', '.join(EXEC_API_VERSIONS)}")
    mode = _string(body, "interactiveMode", where)
    if mode is None and api_version.endswith("/v1"):
        raise KubeConfigError(f"{where}: interactiveMode must be set for apiVersion {api_version} (as kubectl says)")
    mode = mode or "IfAvailable"
    if mode not in INTERACTIVE_MODES:
        raise KubeConfigError(f"{where}: interactiveMode {mode!r} is not one of {', '.join(INTERACTIVE_MODES)}")
    args = body.get("args") or []
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise KubeConfigError(f"{where}: args must be a list of strings")
    env: list[tuple[str, str]] = []
    for index, item in enumerate(body.get("env") or []):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not isinstance(item.get("value"),
                                                                                                  str):
            raise KubeConfigError(f"{where}: env[{index}] must have a string name and value")
        env.append((item["name"], item["value"]))
    return ExecSpec(command, tuple(args), tuple(env), api_version, _string(body, "installHint", where),
                    _flag(body, "provideClusterInfo", where), mode)


def _check_tls(access: ClusterAccess, ca_where: str, key_fields: str) -> None:
    """Build the TLS context once now, so that a certificate that cannot be loaded is a configuration error."""
    if not access.https:
        return
    try:
        client_context(access.ca_pem, access.insecure, access.user.cert_pem, access.user.key_pem)
    except TlsMaterialError as e:
        raise KubeConfigError(f"{access.user.where}: {key_fields}{e}" if e.client else f"{ca_where}: {e}") from None
