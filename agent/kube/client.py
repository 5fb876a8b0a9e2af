"""Connecting to the API server: an authenticated JSON request/stream client (on agent/http's HTTP/1.1 client).

In a pod (the agent's DaemonSet) the service account's token and CA come from
``/var/run/secrets/kubernetes.io/serviceaccount`` and the address from ``KUBERNETES_SERVICE_HOST``/``_PORT``;
the token file is re-read every minute, since projected tokens are rotated. Outside a cluster kubeconfig files
(client certificates, tokens, exec credential plugins) are read as kubectl reads them (agent/kube/kubeconfig.py).

``KubeClient.request`` sends one request and returns the response unread, so that a watch can be
streamed line by line; ``KubeClient.call`` reads the whole answer. Paths are the API's own
(``/api/v1/pods``, ``/apis/apps/v1/namespaces/x/daemonsets/y``): the client knows no resource types.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from agent.http import HttpClient, Proxies, Response, Timeouts
from agent.kube.credentials import TOKEN_RELOAD, Credential, CredentialSource, source_for
from agent.kube.kubeconfig import (
    SERVICE_ACCOUNT,
    ClusterAccess,
    KubeConfigError,
    in_cluster,
    kubeconfig_files,
    load_kubeconfig,
)
from agent.kube.tls import TlsMaterialError, client_context

__all__ = ["SERVICE_ACCOUNT", "Connection", "KubeClient", "KubeConfigError", "Reply", "Timeouts", "connect"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Reply:
    """A whole answer: the HTTP status and the body."""

    status: int
    body: bytes

    def json(self) -> Any:
        """The body as JSON, or None when it is not JSON."""
        try:
            return json.loads(self.body)
        except ValueError:
            return None


class KubeClient:
    """Requests to one API server with one user's credentials (see the module docstring)."""

    def __init__(self, access: ClusterAccess, *, token_reload: float = TOKEN_RELOAD) -> None:
        self.access = access
        self.credentials: CredentialSource = source_for(access, token_reload=token_reload)
        # HTTPS_PROXY, HTTP_PROXY and NO_PROXY apply, as they do to kubectl and client-go
        self.http = HttpClient(proxies=Proxies.from_environ(os.environ))
        self._tls: tuple[bytes | None, bytes | None, ssl.SSLContext] | None = None  # for (cert, key)

    async def credential(self) -> Credential:
        """The credential the next request will carry (``KubeConfigError`` when none can be had)."""
        return await self.credentials.get()

    async def request(self, method: str, path: str, *, params: Sequence[tuple[str, str]] = (),
                      body: Mapping[str, Any] | None = None, timeouts: Timeouts,
                      idempotent: bool | None = None) -> Response:
        """Send one request; the response is not read (``async with`` it). Raises ``agent.http.HttpError``
        (naming the request), or ``KubeConfigError`` when no credential can be had (an exec plugin that fails).
        ``idempotent``: whether it may be sent again on a new connection when a pooled one turns out closed
        (default: by method)."""
        credential = await self.credentials.get()
        headers = [("Accept", "application/json"), ("User-Agent", "ambit")]
        if credential.authorization:
            headers.append(("Authorization", credential.authorization))
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers.append(("Content-Type", "application/json"))
        url = self.access.server + path + (f"?{urlencode(list(params))}" if params else "")
        response = await self.http.request(method, url, headers=headers, body=data, timeouts=timeouts,
                                           tls=self._tls_for(credential), server_hostname=self.access.tls_server_name,
                                           idempotent=idempotent)
        if response.status == 401:
            self.credentials.rejected(credential)
        return response

    async def call(self, method: str, path: str, *, body: Mapping[str, Any] | None = None, timeouts: Timeouts,
                   idempotent: bool | None = None) -> Reply:
        """One request, its answer read whole."""
        async with await self.request(method, path, body=body, timeouts=timeouts, idempotent=idempotent) as response:
            return Reply(response.status, await response.read())

    def _tls_for(self, credential: Credential) -> ssl.SSLContext | None:
        if not self.access.https:
            return None
        pair = (credential.cert_pem, credential.key_pem)
        if self._tls is None or self._tls[:2] != pair:
            try:
                context = client_context(self.access.ca_pem, self.access.insecure, *pair)
            except TlsMaterialError as e:  # the kubeconfig's own material was checked when loaded: an exec plugin's
                raise KubeConfigError(f"{self.access.user.where}: exec plugin's clientCertificateData, "
                                      f"clientKeyData: {e}") from None
            self._tls = (*pair, context)  # new connections use it; pooled ones of the old pair expire
        return self._tls[2]

    async def close(self) -> None:
        await self.http.close()


@dataclass
class Connection:
    api: KubeClient
    origin: str  # "in-cluster" or the kubeconfig path(s), for logs

    async def close(self) -> None:
        await self.api.close()


async def connect(
    kubeconfig: Path | None,
    *,
    context: str | None = None,
    service_account: Path = SERVICE_ACCOUNT,
    environ: Mapping[str, str] | None = None,
) -> Connection:
    """A client for ``kubeconfig``; with None, in-cluster config when in a pod, else the default kubeconfig.

    The default kubeconfig is ``$KUBECONFIG`` (which may list several files, merged) or ``~/.kube/config``;
    ``context`` overrides their ``current-context``. The credential is obtained now (an exec plugin is run), so
    that a configuration that cannot work fails here with ``KubeConfigError``.
    """
    env = os.environ if environ is None else environ
    if kubeconfig is None and env.get("KUBERNETES_SERVICE_HOST"):
        access = in_cluster(service_account, env)
    else:
        access = load_kubeconfig(kubeconfig_files(kubeconfig, env), context)
    client = KubeClient(access)
    await client.credential()
    log.info("Kubernetes API %s (%s)", access.server,
             "in-cluster service account" if access.origin == "in-cluster" else f"kubeconfig {access.origin}")
    return Connection(client, access.origin)
