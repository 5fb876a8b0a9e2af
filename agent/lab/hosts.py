"""Service names in lab pods, as cluster DNS answers them: one hosts file per pod network namespace.

``ip netns exec NS`` (``ambit lab exec``, and every process the lab starts in a pod) bind-mounts
``/etc/netns/NS/hosts`` over ``/etc/hosts``. ``hosts_file`` makes the text for a pod: what kubelet writes
(localhost, the pod's own name at each of its addresses, IPv6 too in a dual-stack lab) and, for every
Service, ``<svc>.<ns>``, ``<svc>.<ns>.svc`` and ``<svc>.<ns>.svc.cluster.local``, plus the bare ``<svc>``
for the Services of the pod's own namespace (the search path ``<ns>.svc.cluster.local`` a pod's resolv.conf
gives it). A ClusterIP Service resolves to its VIPs (a dual-stack one to both), a headless one to its
endpoints' addresses.

Next to it, ``resolv.conf`` names a DNS server that is not there (127.0.0.1 in the pod, where nothing
listens): the lab has no DNS server, and a lookup the hosts file cannot answer (an IPv6 address for an
IPv4-only Service, an unknown name) then fails at once instead of after the host's resolver's timeouts.

The files are rewritten in place, not replaced: the bind mount holds the file's inode, so a process started
before a change still reads the new names (glibc reads /etc/hosts on every lookup), as with cluster DNS. A
lookup that races the rewrite may see a mix of the old and new text for that one lookup.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from agent.mesh.model import Service
from agent.mesh.store import MeshState

ETC_NETNS = Path("/etc/netns")
HOSTS = "hosts"
RESOLV_CONF = "resolv.conf"
FILES = (HOSTS, RESOLV_CONF)
NO_DNS = """# written by `ambit lab` (agent/lab/hosts.py): no DNS server in the lab, names come from /etc/hosts
nameserver 127.0.0.1
options attempts:1 timeout:1
"""


def names(svc: Service, client_namespace: str) -> list[str]:
    """The names a pod of ``client_namespace`` resolves a Service by."""
    qualified = [f"{svc.name}.{svc.namespace}", f"{svc.name}.{svc.namespace}.svc", svc.hostname]
    return [svc.name, *qualified] if svc.namespace == client_namespace else qualified


def hosts_file(state: MeshState, namespace: str, pod_name: str, pod_ips: Sequence[str]) -> str:
    """The hosts file of pod ``namespace/pod_name``, whose addresses are ``pod_ips``."""
    lines = ["# written by `ambit lab` (agent/lab/hosts.py): the pod's names and the cluster's Services",
             "127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback",
             *(f"{ip}\t{pod_name}" for ip in pod_ips)]
    for key in sorted(state.services):
        svc = state.services[key]
        addresses = svc.vips or tuple(sorted(state.endpoints.get(key, {})))
        aliases = " ".join(names(svc, namespace))
        lines += [f"{ip}\t{aliases}" for ip in addresses]
    return "\n".join(lines) + "\n"


def path(pod_netns: str, name: str = HOSTS) -> Path:
    return ETC_NETNS / pod_netns / name


def write_pod(pod_netns: str, hosts_text: str) -> None:
    """The pod's hosts file and resolv.conf."""
    write(path(pod_netns, HOSTS), hosts_text)
    write(path(pod_netns, RESOLV_CONF), NO_DNS)


def write(target: Path, text: str) -> None:
    """Make ``target`` hold ``text``, in place (see the module docstring)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode()
    fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        if os.pread(fd, len(data) + 1, 0) == data:
            return
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


def remove(netns_names: Iterable[str], prefix: str) -> list[str]:
    """Remove the files (and their directories) of the given namespaces and of any namespace whose name starts
    with ``prefix``; then /etc/netns itself if that leaves it empty. Returns what could not be removed."""
    doomed = set(netns_names)
    with contextlib.suppress(FileNotFoundError):
        doomed |= {entry for entry in os.listdir(ETC_NETNS) if entry.startswith(prefix)}
    left = []
    for netns_name in sorted(doomed):
        directory = ETC_NETNS / netns_name
        try:
            for name in FILES:
                (directory / name).unlink(missing_ok=True)
            directory.rmdir()
        except FileNotFoundError:
            pass
        except OSError as e:
            left.append(f"{directory}: {e.strerror}")
    with contextlib.suppress(OSError):
        ETC_NETNS.rmdir()  # only when empty: other labs' files stay
    return left
