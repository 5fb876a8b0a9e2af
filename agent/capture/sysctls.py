"""The kernel settings the capture needs, set while it runs and put back when it is removed.

The door (``ambit_pod_egress``, see bpf/redirect.c) hands what it captures back to the ingress of the pod's
host veth, so the packet re-enters the node's IP stack on an interface it did not come from:

* ``net.ipv4.tcp_early_demux = 0`` in the node namespace. The packets of a door-captured connection that
  the node forwards after a NAT (a Service VIP DNATed on this node, a NodePort) or from an interface without
  a pod program (an overlay) would otherwise be matched early, on their way in, to the agent's socket for the
  connection, and a packet that carries a socket is never forwarded (``ip_forward`` drops it): the first
  data packet after the handshake was lost, every time (measured in the lab). Early demux only saves a route
  lookup for TCP delivered to the node's own sockets; what the agent captures is assigned by the programs
  and never took that path. Restored to the kernel's default (1) when the capture is removed.
* ``net.ipv4.tcp_tw_reuse = 1`` in the node namespace (default 2: loopback only). The agent dials each
  enrolled pod from its client's address, and as the client half-closes first, the agent's upstream socket
  sends the first FIN and keeps the TIME_WAIT, in the node's namespace: every pod's inbound connections
  gather there. connect() picks ports of one parity for a 4-tuple (about 14,100 of 32768-60999), so past
  that many TIME_WAITs from one client to one pod it searched the whole range on every connect: the server
  agent's CPU per connection went from ~0.7 to ~4.5 ms after ~14,000 connections in a minute (measured,
  `python -m bench.connprofile --rounds 10`). With reuse, connect() takes a TIME_WAIT tuple whose last
  segment is over a second old (TCP timestamps tell its segments from the new connection's, RFC 7323).
  Restored to the kernel's default (2) when the capture is removed.
* per door veth ``accept_local = 1`` (a connection the node itself opens to the pod re-enters with one of
  the node's own addresses as source, a "martian" otherwise) and ``rp_filter = 0`` (a same-node client's
  address is routed via its own veth, not the pod's); on a bridge CNI's port, where the door hands its captures
  to the bridge, both go on the bridge instead (``Redirector._door_site``). The veth goes with the pod; on
  release (of the bridge's last door) and uninstall both go back to the namespace's ``conf/default`` values,
  what a new interface gets. A node whose ``conf/all/rp_filter`` is
  1 (strict) overrides the per-interface 0: door captures from other pods of the node are then dropped by
  the kernel (fail-closed, not a leak); ``start()`` logs it.

IPv6 needs nothing more: its input path reads the same ``net.ipv4.tcp_early_demux`` (``ip6_rcv_finish_core``;
from the kernel's code, not measured: the lab has no IPv6 Services to NAT), and it has neither ``accept_local`` nor
``rp_filter``, so a door capture of a connection from the node's own IPv6 address or from a neighbour pod
re-enters the veth without any setting (measured: tests/e2e/test_capture.py, the door over IPv6).

``root`` is where the node's /proc/sys is: /proc/sys for an agent that may write it, the host's /proc/sys/net
mounted elsewhere in a container (a container's own /proc/sys is read-only; Cilium mounts the host's the
same way).
"""

from __future__ import annotations

import logging
import os

from agent.capture import netns as netns_mod

log = logging.getLogger(__name__)

EARLY_DEMUX = "net/ipv4/tcp_early_demux"
TW_REUSE = "net/ipv4/tcp_tw_reuse"
NODE_SETTINGS = {EARLY_DEMUX: ("0", "1"), TW_REUSE: ("1", "2")}  # key -> (the capture's, the kernel's default)
DOOR_SETTINGS = {"accept_local": "1", "rp_filter": "0"}
PROC_SYS = "/proc/sys"


def read(netns: str | None, key: str, root: str = PROC_SYS) -> str:
    """A sysctl of `netns` (``key`` as a path under /proc/sys: ``net/ipv4/tcp_early_demux``)."""
    # not pathlib: it interns every part of every path (two per pod)
    with netns_mod.entered(netns), open(os.path.join(root, key)) as f:
        return f.read().strip()


def write(netns: str | None, key: str, value: str, root: str = PROC_SYS) -> None:
    """Set a sysctl of `netns`; OSError names the key."""
    try:
        with netns_mod.entered(netns), open(os.path.join(root, key), "w") as f:
            f.write(value)
    except OSError as e:
        raise OSError(e.errno, f"cannot set {key.replace('/', '.')}={value} under {root}: {e.strerror}") from None


def install(netns: str | None, root: str = PROC_SYS) -> None:
    """The node-wide settings; warns when strict reverse-path filtering will drop door captures."""
    for key, (value, _default) in NODE_SETTINGS.items():
        write(netns, key, value, root)
    if read(netns, "net/ipv4/conf/all/rp_filter", root) == "1":
        log.error("net.ipv4.conf.all.rp_filter=1 (strict): connections reaching enrolled pods from other pods "
                  "of this node through a Service or the node will be dropped by the kernel, not captured; set it "
                  "to 0 or 2 (loose), as Cilium and Calico require too")


def remove(netns: str | None, root: str = PROC_SYS) -> None:
    for key, (_value, default) in NODE_SETTINGS.items():
        write(netns, key, default, root)


def open_door(netns: str | None, ifname: str, root: str = PROC_SYS) -> None:
    """Let `ifname` (a pod's host veth) take back what its door captured."""
    for name, value in DOOR_SETTINGS.items():
        write(netns, f"net/ipv4/conf/{ifname}/{name}", value, root)


def close_door(netns: str | None, ifname: str, root: str = PROC_SYS) -> None:
    """Back to what a new interface gets (skipped when the veth is already gone with its pod)."""
    for name in DOOR_SETTINGS:
        key = f"net/ipv4/conf/{ifname}/{name}"
        try:
            write(netns, key, read(netns, f"net/ipv4/conf/default/{name}", root), root)
        except OSError as e:
            log.debug("door settings of %s not restored: %s", ifname, e)
