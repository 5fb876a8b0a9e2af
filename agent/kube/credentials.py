"""The credential each request carries, kept fresh: fixed ones, token files re-read every minute (projected
service account tokens rotate), and exec credential plugins re-run before what they issued expires.

An exec plugin (``client.authentication.k8s.io/v1`` or ``v1beta1``) is run as kubectl runs it: the user's
``command``/``args``/``env`` added to the agent's environment, ``KUBERNETES_EXEC_INFO`` holding an
``ExecCredential`` request (``spec.interactive`` is false: the agent has no terminal; ``spec.cluster`` when
``provideClusterInfo``), stdin closed; it prints an ``ExecCredential`` whose ``status`` has a ``token`` and/or a
``clientCertificateData``/``clientKeyData`` pair, and maybe an ``expirationTimestamp``. The answer is kept until
shortly before it expires, or until the API server answers 401 to it; concurrent requests share one run. A re-run
that fails before the credential has expired is logged and tried again a little later, the credential meanwhile
still in use; once it has expired (or was refused), the failure is the request's.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from agent.kube.kubeconfig import ClusterAccess, ExecSpec, KubeConfigError, UserSpec

log = logging.getLogger(__name__)

TOKEN_RELOAD = 60.0  # seconds between reads of a token file (client-go's period)
EXEC_TIMEOUT = 60.0  # seconds an exec plugin may take
EXEC_REFRESH_BEFORE = 30.0  # re-run a plugin this long before its credential expires (at most a quarter of its life)
EXEC_RETRY = 5.0  # after a failed early re-run, seconds before the next try (the credential still works meanwhile)


@dataclass(frozen=True)
class Credential:
    """What a request presents: an ``Authorization`` header value and/or a client key pair (PEM)."""

    authorization: str | None = None
    cert_pem: bytes | None = None
    key_pem: bytes | None = None


class CredentialSource(Protocol):
    async def get(self) -> Credential:
        """The credential for the next request; ``KubeConfigError`` when none can be had."""
        ...

    def rejected(self, credential: Credential) -> None:
        """The API server answered 401 to ``credential``: do not use it again if a fresher one can be had."""
        ...


class Fixed:
    def __init__(self, credential: Credential) -> None:
        self.credential = credential

    async def get(self) -> Credential:
        return self.credential

    def rejected(self, credential: Credential) -> None:
        pass


def bearer(token: str) -> str:
    return f"Bearer {token}"


class TokenFile:
    """A bearer token read from ``path``, again every ``reload`` seconds and after a 401. A read that fails (the
    file being replaced, empty) keeps the last token and is logged."""

    def __init__(self, path: Path, where: str, *, reload: float = TOKEN_RELOAD,
                 base: Credential = Credential()) -> None:
        self.path, self.where, self.reload, self.base = path, where, reload, base
        token = self._read()
        if isinstance(token, str):
            raise KubeConfigError(f"{where}: token file {path}: {token}")
        self.credential = Credential(bearer(token.decode()), base.cert_pem, base.key_pem)
        self.read_at = time.monotonic()

    def _read(self) -> bytes | str:
        """The token, or why there is none."""
        try:
            token = self.path.read_bytes().strip()
        except OSError as e:
            return e.strerror or str(e)
        return token if token else "empty"

    async def get(self) -> Credential:
        if time.monotonic() - self.read_at >= self.reload:
            self.read_at = time.monotonic()
            token = self._read()
            if isinstance(token, str):
                log.warning("%s: cannot re-read the token file %s (%s): keeping the last token", self.where,
                            self.path, token)
            elif bearer(token.decode()) != self.credential.authorization:
                self.credential = Credential(bearer(token.decode()), self.base.cert_pem, self.base.key_pem)
                log.info("%s: the token in %s changed", self.where, self.path)
        return self.credential

    def rejected(self, credential: Credential) -> None:
        self.read_at = -self.reload  # read again before the next request: the token may have rotated


class ExecPlugin:
    """Credentials from an exec plugin (see the module docstring); ``base`` (the kubeconfig's own token or key
    pair) takes precedence over what the plugin gives, as in kubectl."""

    def __init__(self, spec: ExecSpec, cluster: ClusterAccess, where: str, *, base: Credential = Credential(),
                 timeout: float = EXEC_TIMEOUT) -> None:
        self.spec, self.cluster, self.where, self.base = spec, cluster, f"{where}: exec plugin {spec.command}", base
        self.timeout = timeout
        self.credential: Credential | None = None
        self.expiry: float | None = None  # wall clock (the plugin states expiry in wall-clock time); None: never
        self.refresh_at: float | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> Credential:
        async with self._lock:
            if self.credential is None or (self.refresh_at is not None and time.time() >= self.refresh_at):
                try:
                    self.credential = await self._run()
                except KubeConfigError as e:
                    now = time.time()
                    if self.credential is None or self.expiry is None or now >= self.expiry:
                        raise
                    self.refresh_at = min(self.expiry, now + EXEC_RETRY)
                    log.warning("%s; the current credential stays in use until it expires in %.0f s", e,
                                self.expiry - now)
            return self.credential

    def rejected(self, credential: Credential) -> None:
        if credential is self.credential:
            self.credential = None

    async def _run(self) -> Credential:
        if self.spec.interactive_mode == "Always":
            raise KubeConfigError(f"{self.where}: interactiveMode Always needs a terminal, which this process has not")
        env = {**os.environ, **dict(self.spec.env), "KUBERNETES_EXEC_INFO": json.dumps(self._request())}
        try:
            process = await asyncio.create_subprocess_exec(
                self.spec.command, *self.spec.args, env=env, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        except OSError as e:
            hint = f"; {self.spec.install_hint.strip()}" if self.spec.install_hint else ""
            raise KubeConfigError(f"{self.where}: cannot run it: {e.strerror or e}{hint}") from None
        try:
            async with asyncio.timeout(self.timeout):
                out, err = await process.communicate()
        except TimeoutError:
            raise KubeConfigError(f"{self.where}: no answer within {self.timeout:g} s") from None
        finally:
            if process.returncode is None:  # timed out or cancelled: do not leave it running
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        if process.returncode != 0:
            said = err.decode(errors="replace").strip()[-500:] or "nothing on stderr"
            raise KubeConfigError(f"{self.where}: exited with status {process.returncode}: {said}")
        credential, expiry = parse_exec_credential(out, self.spec.api_version, self.where)
        now = time.time()
        self.expiry = expiry
        self.refresh_at = None if expiry is None else expiry - min(EXEC_REFRESH_BEFORE, max(expiry - now, 0) / 4)
        log.debug("%s: credential obtained%s", self.where,
                  "" if expiry is None else f", expires in {expiry - now:.0f} s")
        base = self.base
        return Credential(base.authorization or credential.authorization, base.cert_pem or credential.cert_pem,
                          base.key_pem or credential.key_pem)

    def _request(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"interactive": False}
        if self.spec.provide_cluster_info:
            cluster: dict[str, Any] = {"server": self.cluster.server}
            if self.cluster.tls_server_name:
                cluster["tls-server-name"] = self.cluster.tls_server_name
            if self.cluster.insecure:
                cluster["insecure-skip-tls-verify"] = True
            if self.cluster.ca_pem is not None:
                cluster["certificate-authority-data"] = base64.b64encode(self.cluster.ca_pem).decode()
            if self.cluster.exec_extension is not None:
                cluster["config"] = self.cluster.exec_extension
            spec["cluster"] = cluster
        return {"apiVersion": self.spec.api_version, "kind": "ExecCredential", "spec": spec}


def parse_exec_credential(output: bytes, api_version: str, where: str) -> tuple[Credential, float | None]:
    """An exec plugin's answer: the credential and its expiry (seconds since the epoch), or ``KubeConfigError``."""
    try:
        answer = json.loads(output)
    except ValueError as e:
        raise KubeConfigError(f"{where}: its output is not an ExecCredential in JSON ({e})") from None
    if not isinstance(answer, dict) or answer.get("kind") != "ExecCredential":
        raise KubeConfigError(f"{where}: its output is not an ExecCredential (kind {_kind(answer)!r})")
    if answer.get("apiVersion") != api_version:
        raise KubeConfigError(f"{where}: it answered apiVersion {answer.get('apiVersion')!r}, "
                              f"the kubeconfig asks for {api_version}")
    status = answer.get("status")
    if not isinstance(status, dict):
        raise KubeConfigError(f"{where}: its ExecCredential has no status")
    fields = {name: status.get(name) for name in ("token", "clientCertificateData", "clientKeyData")}
    for name, value in fields.items():
        if value is not None and not isinstance(value, str):
            raise KubeConfigError(f"{where}: status.{name} must be a string")
    token, cert, key = fields["token"] or None, fields["clientCertificateData"] or None, fields["clientKeyData"] or None
    if (cert is None) != (key is None):
        raise KubeConfigError(f"{where}: status has only one of clientCertificateData and clientKeyData")
    if token is None and cert is None:
        raise KubeConfigError(f"{where}: status has neither a token nor clientCertificateData and clientKeyData")
    expiry = None
    stamp = status.get("expirationTimestamp")
    if stamp is not None:
        try:
            expiry = datetime.datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp()
        except ValueError:
            raise KubeConfigError(f"{where}: status.expirationTimestamp {stamp!r} is not an RFC 3339 time") from None
    return Credential(bearer(token) if token else None, cert.encode() if cert else None,
                      key.encode() if key else None), expiry


def _kind(answer: Any) -> Any:
    return answer.get("kind") if isinstance(answer, dict) else type(answer).__name__


def source_for(cluster: ClusterAccess, *, token_reload: float = TOKEN_RELOAD) -> CredentialSource:
    """The credential source of ``cluster``'s user: its token (or token file) and key pair, and its exec plugin."""
    user: UserSpec = cluster.user
    authorization = bearer(user.token) if user.token else None
    if user.username is not None:
        basic = base64.b64encode(f"{user.username}:{user.password or ''}".encode()).decode()
        authorization = f"Basic {basic}"
    base = Credential(authorization, user.cert_pem, user.key_pem)
    if authorization is None and user.token_file is not None:
        return TokenFile(user.token_file, user.where, reload=token_reload, base=base)
    if user.exec is not None:
        return ExecPlugin(user.exec, cluster, user.where, base=base)
    return Fixed(base)
