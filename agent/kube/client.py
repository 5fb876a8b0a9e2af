"""Connecting to the API server: in-cluster service account, or a kubeconfig file.

In a pod (the agent's DaemonSet) the service account's token and CA come from
``/var/run/secrets/kubernetes.io/serviceaccount`` and the address from ``KUBERNETES_SERVICE_HOST``/``_PORT``;
the token file is re-read every minute, since projected tokens are rotated. Outside a cluster a kubeconfig
(client certificates, tokens, exec plugins, OIDC) is used as kubectl would.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from kubernetes_asyncio.client import ApiClient, Configuration
from kubernetes_asyncio.config import ConfigException, load_kube_config, refresh_token
from kubernetes_asyncio.config.incluster_config import InClusterConfigLoader

log = logging.getLogger(__name__)

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class KubeConfigError(Exception):
    """No usable way to reach the API server."""


@dataclass
class Connection:
    api: ApiClient
    origin: str  # "in-cluster" or the kubeconfig path, for logs
    refresher: asyncio.Task[None] | None = None  # re-runs a kubeconfig's exec/gcp credential plugin

    async def close(self) -> None:
        if self.refresher is not None:
            self.refresher.cancel()
            await asyncio.gather(self.refresher, return_exceptions=True)
        await self.api.close()


async def connect(
    kubeconfig: Path | None,
    *,
    context: str | None = None,
    service_account: Path = SERVICE_ACCOUNT,
    environ: Mapping[str, str] | None = None,
) -> Connection:
    """A client for ``kubeconfig``; with None, in-cluster config when in a pod, else the default kubeconfig.

    The default kubeconfig is ``$KUBECONFIG`` (which may list several files) or ``~/.kube/config``.
    """
    env = os.environ if environ is None else environ
    configuration = Configuration()
    if kubeconfig is None and env.get("KUBERNETES_SERVICE_HOST"):
        try:
            InClusterConfigLoader(str(service_account / "token"), str(service_account / "ca.crt"),
                                  environ=dict(env)).load_and_set(configuration)
        except ConfigException as e:
            raise KubeConfigError(f"in-cluster Kubernetes config ({service_account}): {e}") from None
        log.info("Kubernetes API %s (in-cluster service account)", configuration.host)
        return Connection(ApiClient(configuration), "in-cluster")
    where = _kubeconfig(kubeconfig, env)
    try:
        loader = await load_kube_config(config_file=where, context=context, client_configuration=configuration,
                                        persist_config=False)
    except (ConfigException, OSError, ValueError, KeyError, AssertionError) as e:
        raise KubeConfigError(f"kubeconfig {where}: {e or type(e).__name__}") from None
    api = ApiClient(configuration)
    refresher = None
    user = getattr(loader, "_user", None)
    if loader.provider == "gcp" or (user is not None and "exec" in user):
        # Plugin-issued tokens expire; the library's refresher re-runs the plugin and updates the client.
        refresher = asyncio.create_task(refresh_token(loader, configuration), name="kubeconfig token refresh")
    log.info("Kubernetes API %s (kubeconfig %s)", configuration.host, where)
    return Connection(api, where, refresher)


def _kubeconfig(kubeconfig: Path | None, env: Mapping[str, str]) -> str:
    """The kubeconfig file(s) to load (``os.pathsep``-separated, as ``$KUBECONFIG``), checked to exist."""
    if kubeconfig is not None:
        if not kubeconfig.is_file():
            raise KubeConfigError(f"kubeconfig {kubeconfig} does not exist")
        return str(kubeconfig)
    paths = env.get("KUBECONFIG") or str(Path("~/.kube/config").expanduser())
    if not any(Path(p).expanduser().is_file() for p in paths.split(os.pathsep) if p):
        raise KubeConfigError(f"not in a cluster (KUBERNETES_SERVICE_HOST unset) and no kubeconfig at {paths}")
    return paths
