"""Redirector: loads bpf/redirect.c and steers enrolled pods' TCP into the agent's listeners.

What runs where (node network namespace, where the agent lives):
  - `ambit_pod_ingress` on the host side of every enrolled pod's veth (ingress = packets FROM the pod):
    a new TCP connection goes to the outbound listener (15001); packets of the agent's own sockets
    (the accepted one, and the IP_TRANSPARENT upstream bound to the client pod's IP) are assigned back.
  - `ambit_uplink_ingress` on the uplink(s): new TCP to an enrolled local pod goes to 15008 (dport
    15008) or 15006; replies to the agent's sockets bound to a local pod's IP are assigned back.
  - bridge CNIs (cni0): when a pod's veth is a bridge port, a socket assigned there would not survive the
    bridge, and frames between pods of one bridge never reach the IP stack; the port's program then only
    hands enrolled pods' TCP up to the bridge (destination MAC := the bridge's, `bridge_ports` map) and the
    pod program, attached to the bridge too, decides there (tests/e2e/test_bridge_cni.py).
  - `ambit_sk_lookup` (SK_LOOKUP, netns link) once the agent registers its listeners: answers the
    listener lookups the tc programs cannot pre-assign (a SYN that meets a TIME_WAIT socket).
  - policy routing: `100: fwmark 0x539 lookup 100` + `local 0.0.0.0/0 dev lo table 100` delivers the
    assigned (marked) packets locally; `99: fwmark 0x539 iif lo goto 32766` exempts the agent's OWN marked
    packets (its upstream connections), which that rule would otherwise loop back to itself. The same for
    IPv6 (`ip -6 rule`, `local ::/0 dev lo table 100`) where the namespace has IPv6 (`routing`).
  - `ambit_pod_egress` on the egress of every enrolled pod's veth (routed CNIs): the pod's door, which sees
    every packet going INTO the pod whatever way it came (a Service VIP DNATed on this node, a NodePort, the
    node's own processes, an overlay): it hands new connections (and the later packets of flows the agent
    owns) back to the veth's ingress, where `ambit_pod_ingress` assigns them as the pod's inbound. Connections
    the node itself opens to the pod's probe ports pass (`set_probe_ports`); `node_passes=True` lets every
    connection from the node pass, as Istio does. Needs `tcp_early_demux` off and two settings per door veth
    (`sysctls`). On a bridge CNI's port the door hands its captures to the bridge instead (destination MAC :=
    the bridge's), whose stack and pod program take them as on the pod's own frames; the two settings then go
    on the bridge, where they re-enter the stack (`_door_site`), while any door of its ports is open.
  - rp_filter 0 and 2 on the node's interfaces both work; 1 (strict) drops door captures from other pods of
    the node (logged); forwarding is the node's business, not ours.

Mechanism, chosen by measurement (`python -m bench.capture_design`, this VM: Linux 6.18, 2 vCPU,
bcc 0.26; lab pods are network namespaces; two runs, numbers from the second where they differ):
  1. Steering: tc + bpf_sk_assign (existing-socket lookup, else the listener for a SYN), not the pure
     hybrid (tc only marks, SK_LOOKUP picks every listener). Connection set-up pod -> pod on another node,
     500 connects: direct 40-68 us median, tc sk_assign 29-30 us, pure hybrid 26-31 us: no difference
     beyond noise (the SYN-ACK comes from the local listener either way). tc assignment works with any
     listener on the port, the pure hybrid only with sockets registered in the sockmap.
  2. Plus SK_LOOKUP for port reuse: a client reusing its source port while the agent's side of the
     previous connection is in TIME_WAIT (server closes first), 99 connects: tc only 10.9-11.0 ms median,
     99/99 over 5 ms (the kernel's TIME_WAIT path finds no listener for the original port: challenge ACK,
     RST, SYN retransmit); with the SK_LOOKUP program and registered listeners 51-55 us median, 0/99 over
     5 ms. It also keeps such a SYN away from any node listener on the original port. Hence
     `register_listener()` for 15001/15006/15008.
  3. Attachment: tcx links first in the chain, pinned in bpffs; clsact filters (rtnetlink) as fallback.
     - Another tool's tcx program on the pod's veth returning TC_ACT_OK (a CNI using tcx does that):
       with our clsact filter the enrolled pod's connection went DIRECTLY, uncaptured (legacy tc never
       runs after a tcx verdict); with our tcx link placed first it was captured. Untouched packets return
       TC_ACT_UNSPEC so the rest of the chain (the CNI) still sees them.
     - kill -9 of the agent: clsact filter -> new connections fail (fail-closed); pinned tcx link ->
       fail; UNPINNED tcx link -> went through DIRECTLY (fail-open). So tcx links are always pinned.
     - Per-packet cost: the same program either way, 420-470 ns per run on an enrolled pod's full path
       (socket lookup miss + flow-table miss); bulk a -> b with b enrolled, 7 interleaved rounds of
       256 MiB: none 17.2-18.2, clsact 16.9-17.8, tcx 17.8-18.8 Gbit/s median, ranges overlapping
       (13-26): no measurable difference. With the door and both IP families (16-byte keys), over a
       connection older than b's enrollment (so b's ACKs take the pod program's full path and a's data the
       door's), three interleaved runs of 7 rounds before/after the IPv6 change, medians: pod program
       461-550 -> 480-580 ns/run, door 343-397 -> 355-413 ns/run, throughput 17-25 Gbit/s either way with
       ranges overlapping; IPv6 over the same path in a dual-stack lab: 505-950 ns/run (IPv4 in the same
       run 495-1200; a loaded machine), throughput the same.
     - Cost of control operations: start (compile + load) 0.76-0.92 s; enroll 1.0-1.3 ms/pod with
       clsact, 12 ms/pod with tcx (link create 6 ms + first-attach RCU grace periods; detach 16 ms);
       reconcile of 20 pods after a restart 53-74 ms clsact, 25-34 ms tcx (BPF_LINK_UPDATE in place).
     tcx needs Linux >= 6.6 and a mounted bpffs (`bpffs=`, default /sys/fs/bpf, which is NOT mounted on
     the project's VM: `mount -t bpf bpf /sys/fs/bpf` or backend="auto" falls back to clsact, logged).

Fail-closed: the programs stay attached when the agent dies (pin or tc filter). A SYN from/to an enrolled
pod with no listener on the agent's port is dropped (event DROP/NO_LISTENER); packets of flows the agent
had taken over (LRU flow table) whose socket is gone are dropped too, so nothing of them goes out in the
clear. `set_fail_open(True)` (a config-map flag) forwards them unchanged instead. Connections opened
before enrollment are not in the flow table and keep flowing uncaptured.

Restart: `start()` is idempotent over a crashed agent's leftovers (rules/route present -> kept, uplink
program swapped in place); then `reconcile(desired)` fills the new maps, swaps every pod's program in
place and removes anything of ours that is not desired (duplicates, released pods, other backend, pins
of vanished devices). Call reconcile() right after start().

IPv4 and IPv6: every program handles both (bpf/redirect.c keeps addresses as 16 bytes, IPv4 as IPv4-mapped),
and the maps are keyed by address, so a dual-stack pod is enrolled by each of its addresses with the same
interface: `enroll(ip4, veth)` and `enroll(ip6, veth)`, or both as keys of `reconcile()`'s mapping (likewise
`set_probe_ports`); an address not given is not captured. The agent's listeners must answer a lookup of
127.0.0.1:port for IPv4 and [::1]:port for IPv6: one dual-stack socket per port on :: with IPV6_V6ONLY off
(the agent's), or an IPv4 and an IPV6_V6ONLY IPv6 socket. Node-wide settings: `tcp_early_demux` covers IPv6
too (the IPv6 input path reads the same net.ipv4 setting); IPv6 has no rp_filter and no accept_local: a
connection from the node (source: one of its own addresses) re-enters the door veth and is accepted without
one (tests/e2e/test_capture.py, the IPv6 door test).

Fragments: a TCP fragment to or from an enrolled pod is dropped and counted (reason FRAGMENT, counter
drop_fragment) at every hook: it cannot be captured (only a first fragment has ports), and the pod's kernel would
reassemble what passed, so a connection fragmented on purpose would otherwise reach or leave the pod uncaptured
(tests/e2e/test_door.py sends one). TCP sizes its segments to the path and sets DF: no real connection needs them.

Limits: IPv6 packets with an extension header the programs do not skip (see bpf/redirect.c) pass: the receiving
pod's kernel drops them; a destination the node has no route for (a Service VIP on a node without a default route,
which Kubernetes requires) is taken for a local address by the existing-socket check (bpf_fib_lookup answers
NOT_FWDED for both, in either family), so its later packets are not steered. The agent must not spoof the client's
address towards node-local addresses, nor towards a same-node pod that is neither enrolled nor `hook()`ed: those
replies would bypass the programs.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import socket
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from agent.capture import bpfsys, conntrack, sysctls
from agent.capture import netns as netns_mod
from agent.capture.attach import FILTER_HANDLE, FILTER_PRIO, Attachment, Backend, Clsact, Direction, Tcx
from agent.capture.kmap import KernelMap
from agent.capture.loader import Loaded, load
from agent.capture.maps import (
    COUNTER_COUNT,
    F_FAIL_OPEN,
    F_LOOKUP_SELECTS,
    F_NODE_PASSES,
    IF_BRIDGE,
    IF_POD,
    IF_UPLINK,
    LISTENER_FAMILY_STRIDE,
    AddrC,
    BridgePortC,
    ConfigC,
    Counter,
    FlowEvent,
    Listener,
    PodC,
    ProbePortC,
    canonical,
)
from agent.capture.programs import DOOR_PROG, LOOKUP_PROG, POD_PROG, UPLINK_PROG, RedirectError
from agent.capture.ringbuf import RingBufferReader
from agent.capture.routing import ROUTE_TABLE, RULE_PRIORITY, PolicyRouting
from agent.capture.rtnl import Rtnl
from agent.mesh.ports import AGENT_MARK, Ports

log = logging.getLogger(__name__)

@dataclass
class ReconcileResult:
    """What `reconcile()` changed."""

    attached: list[str] = field(default_factory=list)  # interfaces now carrying our program
    removed: list[str] = field(default_factory=list)  # leftovers detached (ifname or ifindex/pin)
    missing: list[str] = field(default_factory=list)  # desired pod IPs whose interface does not exist


def bridge_port(bridge_ifindex: int, mac: bytes) -> BridgePortC:
    """A ``bridge_ports`` value: a port's bridge."""
    return BridgePortC(mac=(ctypes.c_uint8 * 6)(*mac), ifindex=bridge_ifindex)


def pin_filesystem(bpffs: str) -> str:
    """The directory whose filesystem must be a bpffs for tcx pins (``<bpffs>/ambit/<instance>``): ``<bpffs>/ambit``
    when it exists (the DaemonSet mounts only the host's /sys/fs/bpf/ambit, there), else ``bpffs``."""
    own = os.path.join(bpffs, "ambit")
    return own if os.path.isdir(own) else bpffs


class Redirector:
    """Captures enrolled pods' TCP into the agent's listeners (see the module docstring for the design).

    Use from the agent's network namespace (the node's), or pass `netns=` to manage a named namespace
    from outside (the lab and tests do). Not thread-safe: call it from one thread; the event poller may
    run in another.
    """

    def __init__(
        self,
        uplinks: Sequence[str] | None = None,
        *,
        netns: str | None = None,
        ports: Ports = Ports(),
        mark: int = AGENT_MARK,
        table: int = ROUTE_TABLE,
        rule_priority: int = RULE_PRIORITY,
        fail_open: bool = False,
        backend: Literal["auto", "tcx", "clsact"] = "auto",
        bpffs: str = "/sys/fs/bpf",
        instance: str | None = None,
        lookup_selects: bool = False,
        ringbuf_pages: int = 64,
        node_passes: bool = False,
        proc_sys: str = sysctls.PROC_SYS,
    ) -> None:
        if ringbuf_pages <= 0 or ringbuf_pages & (ringbuf_pages - 1):
            raise ValueError("ringbuf_pages must be a power of two")
        self._ringbuf_pages = ringbuf_pages
        self.netns = netns
        self.ports = ports
        self.mark = mark
        self.table = table
        self.rule_priority = rule_priority
        self._fail_open = fail_open
        self._lookup_selects = lookup_selects
        self._node_passes = node_passes
        self._proc_sys = proc_sys
        self._probe_ports: frozenset[tuple[str, int]] = frozenset()
        self._backend_choice = backend
        self._bpffs = bpffs
        self._instance = instance
        self._uplink_names = list(uplinks) if uplinks is not None else None
        self._loaded: Loaded | None = None
        self._maps: dict[str, KernelMap[Any, Any]] = {}
        self._ring: RingBufferReader | None = None
        self._rtnl: Rtnl | None = None
        self._fds: dict[str, int] = {}
        self._clsact: Clsact | None = None
        self._tcx: Tcx | None = None
        self.backend: Backend | None = None
        self.uplinks: dict[str, int] = {}
        self._enrolled: dict[str, tuple[str, int]] = {}  # pod ip -> (ifname, ifindex)
        self._hooked: dict[str, int] = {}  # non-enrolled pod veths with return-path steering
        self._door_sites: dict[int, int] = {}  # door veth ifindex -> where its captures re-enter (_door_site)
        self._listeners: dict[int, socket.socket] = {}  # sockmap slot -> the socket held there
        self._lookup_link_fd: int | None = None
        self._poll_lock = threading.Lock()
        self._netns_ino = 0

    # -- lifecycle --------------------------------------------------------------------------------------
    def start(self) -> Redirector:
        """Compile and load the programs (in a short-lived loader process: see ``loader``), set up policy
        routing, attach to the uplinks. Idempotent setup: running it over the leftovers of a crashed agent adds
        nothing twice."""
        if self._loaded is not None:
            return self
        try:
            self._loaded = loaded = load(self._ringbuf_pages)
            self._fds = dict(loaded.programs)
            m = loaded.maps
            self._maps = {
                "config": KernelMap(m["config"], ctypes.c_uint32, ConfigC),
                "enrolled": KernelMap(m["enrolled"], AddrC, PodC),
                "ifaces": KernelMap(m["ifaces"], ctypes.c_uint32, ctypes.c_uint32),
                "bridge_ports": KernelMap(m["bridge_ports"], ctypes.c_uint32, BridgePortC),
                "probe_ports": KernelMap(m["probe_ports"], ProbePortC, ctypes.c_uint8),
                "counters": KernelMap(m["counters"], ctypes.c_uint32, ctypes.c_uint64, percpu=True),
            }
            self._write_config()
            self._open_kernel()
            self._choose_backend()
            self._routing().install()
            self._untrack_steered()
            sysctls.install(self.netns, self._proc_sys)
            if self._uplink_names is None:
                self._uplink_names = self._default_route_devices()
            for name in self._uplink_names:
                self.uplinks[name] = self._ifindex(name)
            self._attach_uplinks()
            self._ring = RingBufferReader(m["events"])
        except BaseException:
            self.close()
            raise
        return self

    def _untrack_steered(self) -> None:
        """Steered packets skip conntrack (see ``conntrack``); without nft, Service VIPs that a kube-proxy also
        serves fail (reset), which is loud, not a leak: say so and go on."""
        if not conntrack.available():
            log.error("nft not found: captured connections to Service VIPs will be reset where kube-proxy DNATs "
                      "them (install nftables)")
            return
        conntrack.install(self.netns, self.mark)

    def _open_kernel(self) -> None:
        """Netlink, and the two attachment backends' views of the namespace (no programs needed)."""
        with netns_mod.entered(self.netns):
            self._rtnl = rtnl = Rtnl()
            self._netns_ino = os.stat("/proc/thread-self/ns/net").st_ino
        self._clsact = Clsact(rtnl)
        pin_dir = os.path.join(self._bpffs, "ambit", self._instance or f"netns-{self._netns_ino}")
        self._tcx = Tcx(pin_dir, self.netns)

    def uninstall(self) -> list[str]:
        """Remove everything an agent made in this namespace (programs on every interface, pins, rules,
        routes) without loading anything: what a crashed or stopped agent left, for ``ambit uninstall-node``.
        Returns what was found attached."""
        if self._loaded is not None:
            raise RedirectError("uninstall() is for a namespace whose agent is gone; close(detach=True) instead")
        self._open_kernel()
        found = [f"{a.prog_name} on {self._ifname(a.ifindex)} ({a.backend})" for a in self.attachments()]
        self.close(detach=True)
        return found

    def _choose_backend(self) -> None:
        choice = self._backend_choice
        if choice == "clsact":
            self.backend = "clsact"
            return
        problem = None
        pin_fs = pin_filesystem(self._bpffs)
        if not bpfsys.is_bpffs(pin_fs):
            problem = f"{pin_fs} is not a mounted bpffs (mount -t bpf bpf {self._bpffs})"
        else:
            try:  # probe: a tcx link on lo, removed at once
                with netns_mod.entered(self.netns):
                    fd = bpfsys.link_create_tcx(self._fds[POD_PROG], self._ifindex("lo"))
                bpfsys.link_detach(fd)
                os.close(fd)
            except OSError as e:
                problem = f"kernel has no tcx links ({e.strerror}; needs Linux >= 6.6)"
        if problem is None:
            self.backend = "tcx"
        elif choice == "tcx":
            raise RedirectError(f"tcx backend unavailable: {problem}")
        else:
            log.info("tcx unavailable (%s); using clsact filters", problem)
            self.backend = "clsact"

    def close(self, detach: bool = True) -> None:
        """Stop. detach=True removes every attachment, rule and route this agent made (pods go direct).
        detach=False leaves the programs in place (enrolled pods fail closed until an agent comes back,
        exactly as after a crash) and only releases this process's resources."""
        with self._poll_lock:
            if detach and self._rtnl is not None:
                for step in (self._remove_all_attachments, lambda: self._routing().remove(),
                             lambda: conntrack.remove(self.netns), lambda: sysctls.remove(self.netns, self._proc_sys)):
                    try:
                        step()
                    except Exception:
                        log.exception("redirect: cleanup step %s failed", step.__name__)
            if self._lookup_link_fd is not None:
                os.close(self._lookup_link_fd)
                self._lookup_link_fd = None
            if self._ring is not None:
                self._ring.close()
                self._ring = None
            self._maps.clear()  # their fds belong to the loaded set, closed next
            if self._loaded is not None:
                self._loaded.close()
                self._loaded = None
            if self._rtnl is not None:
                self._rtnl.close()
                self._rtnl = None
            self._fds.clear()

    def __enter__(self) -> Redirector:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers ----------------------------------------------------------------------------------------
    @property
    def _kernel(self) -> Rtnl:
        if self._rtnl is None:
            raise RedirectError("Redirector not started")
        return self._rtnl

    def _ifindex(self, ifname: str) -> int:
        found = self._kernel.ifindex(ifname)
        if found is None:
            raise LookupError(f"no interface {ifname!r} in {self.netns or 'this namespace'}")
        return found

    def _bridge_of(self, ifindex: int) -> tuple[int, bytes] | None:
        """(bridge ifindex, bridge MAC) when ``ifindex`` is a port of a bridge (a bridge CNI's cni0)."""
        master = self._kernel.link(ifindex).master
        if not master:
            return None
        bridge = self._kernel.link(master)
        return (master, bridge.address) if bridge.kind == "bridge" else None

    def _attach_bridge_of(self, ifindex: int) -> int | None:
        """A pod on a bridge CNI: its veth sends enrolled pods' TCP up to the bridge, which runs the pod program.
        The bridge's ifindex when ``ifindex`` is a bridge port."""
        bridge = self._bridge_of(ifindex)
        if bridge is None:
            return None
        bridge_ix, mac = bridge
        self._maps["bridge_ports"][ctypes.c_uint32(ifindex)] = bridge_port(bridge_ix, mac)
        self._maps["ifaces"][ctypes.c_uint32(bridge_ix)] = ctypes.c_uint32(IF_BRIDGE)
        self._attach(bridge_ix, POD_PROG)
        return bridge_ix

    def _door_site(self, ifindex: int) -> int:
        """Where what a door captures re-enters the IP stack, the interface whose settings it needs (``sysctls``):
        the pod's veth, or the bridge of a bridge CNI's port."""
        with contextlib.suppress(Exception):  # the veth may be gone with its pod
            if (bridge := self._bridge_of(ifindex)) is not None:
                return bridge[0]
        return ifindex

    def _ifname(self, ifindex: int) -> str:
        with contextlib.suppress(OSError):
            return self._kernel.link(ifindex).name
        return f"#{ifindex}"

    def _default_route_devices(self) -> list[str]:
        devs = []
        for family in (socket.AF_INET, socket.AF_INET6):
            for r in self._kernel.default_routes(family):
                devs += [self._ifname(oif) for oif in r.oifs]
        if not devs:
            raise RedirectError("no uplink given and no default route to find one: pass uplinks=[...]")
        return sorted(set(devs))

    def _routing(self) -> PolicyRouting:
        return PolicyRouting(self._kernel, self.mark, self.table, self.rule_priority)

    def _write_config(self) -> None:
        cfg = ConfigC()
        cfg.flags = ((F_FAIL_OPEN if self._fail_open else 0) | (F_LOOKUP_SELECTS if self._lookup_selects else 0)
                     | (F_NODE_PASSES if self._node_passes else 0))
        cfg.mark = self.mark
        cfg.port[Listener.OUTBOUND] = self.ports.outbound
        cfg.port[Listener.INBOUND] = self.ports.inbound
        cfg.port[Listener.HBONE] = self.ports.hbone
        self._maps["config"][ctypes.c_uint32(0)] = cfg

    # -- attachments -----------------------------------------------------------------------------------
    def _attach(self, ifindex: int, prog: str, direction: Direction = "ingress") -> None:
        assert self.backend is not None and self._tcx is not None and self._clsact is not None
        if self.backend == "tcx":
            self._tcx.attach(ifindex, self._fds[prog], prog, direction)
        else:
            self._clsact.attach(ifindex, self._fds[prog], prog, direction)

    def _open_door(self, ifindex: int, site: int) -> None:
        """The door program toward an enrolled pod; ``site``: its ``_door_site``."""
        if site not in self._door_sites.values():
            sysctls.open_door(self.netns, self._ifname(site), self._proc_sys)
        self._door_sites[ifindex] = site
        self._attach(ifindex, DOOR_PROG, "egress")

    def _close_door(self, ifindex: int) -> None:
        self._detach_ifindex(ifindex, "egress")
        site = self._door_sites.pop(ifindex, ifindex)
        if site not in self._door_sites.values():  # a bridge keeps its settings while a door of its ports is open
            sysctls.close_door(self.netns, self._ifname(site), self._proc_sys)

    def _all_ifindexes(self) -> list[int]:
        return [link.index for link in self._kernel.links()]

    def attachments(self) -> list[Attachment]:
        """Every ambit program on a tc hook in this namespace, of either backend, whoever made it."""
        assert self._tcx is not None and self._clsact is not None
        live, _stale = self._tcx.list()
        return live + self._clsact.list(self._all_ifindexes())

    def _detach(self, att: Attachment) -> None:
        assert self._tcx is not None and self._clsact is not None
        if att.backend == "tcx":
            self._tcx.detach(att)
        else:
            self._clsact.detach(att)

    def _remove_all_attachments(self) -> None:
        assert self._tcx is not None
        doors = set()
        for att in self.attachments():
            self._detach(att)
            if att.direction == "egress":
                doors.add(self._door_sites.get(att.ifindex) or self._door_site(att.ifindex))
        for site in doors:  # the interfaces back to a new interface's settings
            sysctls.close_door(self.netns, self._ifname(site), self._proc_sys)
        self._door_sites.clear()
        _live, stale = self._tcx.list()
        for path in stale:
            Tcx.unpin(path)
        self._tcx.remove_dir()

    def _detach_ifindex(self, ifindex: int, direction: Direction | None = None) -> None:
        """Our programs on `ifindex` (on its `direction` hook only, if given)."""
        for att in self.attachments():
            if att.ifindex == ifindex and direction in (None, att.direction):
                self._detach(att)

    # -- enrollment -----------------------------------------------------------------------------------
    def enroll(self, pod_ip: str, host_ifname: str) -> None:
        """Capture the pod's new TCP connections to and from `pod_ip` (IPv4 or IPv6) from now on (existing ones
        continue uncaptured). A dual-stack pod is enrolled once per address, each with its one interface."""
        self._require_started()
        pod_ip = canonical(pod_ip)
        ifindex = self._ifindex(host_ifname)
        self._maps["enrolled"][AddrC.of(pod_ip)] = PodC(ifindex=ifindex)
        self._maps["ifaces"][ctypes.c_uint32(ifindex)] = ctypes.c_uint32(IF_POD)
        self._attach(ifindex, POD_PROG)
        self._open_door(ifindex, self._attach_bridge_of(ifindex) or ifindex)
        self._enrolled[pod_ip] = (host_ifname, ifindex)

    def release(self, pod_ip: str) -> None:
        """Stop capturing the pod. Connections the agent proxies for it lose their steering (the proxy
        should close them); new connections go direct."""
        self._require_started()
        pod_ip = canonical(pod_ip)
        entry = self._enrolled.pop(pod_ip, None)
        with contextlib.suppress(KeyError):
            del self._maps["enrolled"][AddrC.of(pod_ip)]
        if entry is None:
            return
        _name, ifindex = entry
        if any(ix == ifindex for _n, ix in self._enrolled.values()):
            return
        self._close_door(ifindex)
        if ifindex in self._hooked.values():
            return
        with contextlib.suppress(KeyError):
            del self._maps["ifaces"][ctypes.c_uint32(ifindex)]
        self._detach_ifindex(ifindex)

    def hook(self, host_ifname: str) -> None:
        """Return-path steering only, for a local pod that is NOT enrolled: needed when the proxy connects
        to that pod with a spoofed (client pod) source address, so the replies reach the proxy."""
        self._require_started()
        ifindex = self._ifindex(host_ifname)
        self._maps["ifaces"][ctypes.c_uint32(ifindex)] = ctypes.c_uint32(IF_POD)
        self._attach(ifindex, POD_PROG)
        self._attach_bridge_of(ifindex)
        self._hooked[host_ifname] = ifindex

    def unhook(self, host_ifname: str) -> None:
        """Undo `hook()`."""
        ifindex = self._hooked.pop(host_ifname, None)
        if ifindex is None or any(ix == ifindex for _n, ix in self._enrolled.values()):
            return
        with contextlib.suppress(KeyError):
            del self._maps["ifaces"][ctypes.c_uint32(ifindex)]
        self._detach_ifindex(ifindex)

    def _attach_uplinks(self) -> None:
        for ifindex in self.uplinks.values():
            self._maps["ifaces"][ctypes.c_uint32(ifindex)] = ctypes.c_uint32(IF_UPLINK)
            self._attach(ifindex, UPLINK_PROG)

    def enrolled(self) -> dict[str, str]:
        """Pod address -> host interface, as this Redirector has them (addresses as ``maps.canonical`` spells
        them)."""
        return {ip: name for ip, (name, _ix) in self._enrolled.items()}

    def reconcile(self, desired: Mapping[str, str], hooked: Sequence[str] = ()) -> ReconcileResult:
        """Make the kernel state exactly `desired` (pod address -> host ifname: every address of each pod, IPv4
        and IPv6, a dual-stack pod's two under the same ifname) plus `hooked` interfaces and the uplinks: fills
        the maps, replaces programs in place (a restarted agent takes over the attachments of the crashed one
        without a capture gap), removes anything else of ours. ValueError names an address that is not one,
        before anything changes."""
        self._require_started()
        result = ReconcileResult()
        want_pods: dict[str, tuple[str, int]] = {}
        for ip, name in {canonical(ip): name for ip, name in desired.items()}.items():
            try:
                want_pods[ip] = (name, self._ifindex(name))
            except LookupError:
                result.missing.append(ip)
        want_hooked = {}
        for name in hooked:
            with contextlib.suppress(LookupError):
                want_hooked[name] = self._ifindex(name)

        # maps first, so the programs swapped in below see the full state
        enrolled = self._maps["enrolled"]
        for k in list(enrolled.keys()):
            if k.ip not in want_pods:
                del enrolled[k]
        for ip, (_name, ifindex) in want_pods.items():
            enrolled[AddrC.of(ip)] = PodC(ifindex=ifindex)
        roles = {ix: IF_POD for _n, ix in want_pods.values()} | dict.fromkeys(want_hooked.values(), IF_POD)
        ports: dict[int, tuple[int, bytes]] = {}  # bridge CNI: pod veth -> its bridge; the bridge runs the pod program
        for ix in list(roles):
            if (bridge := self._bridge_of(ix)) is not None:
                ports[ix] = bridge
                roles[bridge[0]] = IF_BRIDGE
        bridge_ports = self._maps["bridge_ports"]
        for k in list(bridge_ports.keys()):
            if k.value not in ports:
                del bridge_ports[k]
        for ix, (bridge_ix, mac) in ports.items():
            bridge_ports[ctypes.c_uint32(ix)] = bridge_port(bridge_ix, mac)
        roles |= dict.fromkeys(self.uplinks.values(), IF_UPLINK)
        ifaces = self._maps["ifaces"]
        for k in list(ifaces.keys()):
            if k.value not in roles:
                del ifaces[k]
        for ix, role in roles.items():
            ifaces[ctypes.c_uint32(ix)] = ctypes.c_uint32(role)

        want_prog: dict[tuple[int, Direction], str] = {
            (ix, "ingress"): (UPLINK_PROG if role == IF_UPLINK else POD_PROG) for ix, role in roles.items()}
        doors = {ix: ports[ix][0] if ix in ports else ix for _n, ix in want_pods.values()}  # door -> its site
        want_prog |= {(ix, "egress"): DOOR_PROG for ix in doors}
        before = self.attachments()
        opened = {att.ifindex: self._door_sites.get(att.ifindex) or doors.get(att.ifindex) or
                  self._door_site(att.ifindex) for att in before if att.direction == "egress"}  # settings set
        for site in set(doors.values()) - set(opened.values()):
            sysctls.open_door(self.netns, self._ifname(site), self._proc_sys)
        for (ix, direction), prog in want_prog.items():  # attach (or swap in place) first: no capture gap
            self._attach(ix, prog, direction)
            result.attached.append(self._ifname(ix) + ("" if direction == "ingress" else " (door)"))
        canonical_clsact = f"{FILTER_PRIO}:{FILTER_HANDLE}"
        for att in before:
            keep = (
                (att.ifindex, att.direction) in want_prog
                and att.backend == self.backend
                and (att.backend == "tcx" or att.ident == canonical_clsact)
            )
            if not keep:
                self._detach(att)
                result.removed.append(f"{self._ifname(att.ifindex)}({att.backend} {att.direction})")
        for site in set(opened.values()) - set(doors.values()):  # no door left: back to a new interface's settings
            sysctls.close_door(self.netns, self._ifname(site), self._proc_sys)
        self._door_sites = doors
        assert self._tcx is not None
        _live, stale = self._tcx.list()
        for path in stale:
            Tcx.unpin(path)
            result.removed.append(path)
        self._enrolled = want_pods
        self._hooked = want_hooked
        return result

    # -- settings, listeners -----------------------------------------------------------------------------
    def set_fail_open(self, fail_open: bool) -> None:
        """Fail-open: when the agent's listener is missing, captured TCP is forwarded unchanged."""
        self._fail_open = fail_open
        if self._loaded is not None:
            self._write_config()

    @property
    def fail_open(self) -> bool:
        """Current fail-open setting."""
        return self._fail_open

    def set_node_passes(self, node_passes: bool) -> None:
        """Every connection the node itself opens to an enrolled pod passes uncaptured (Istio's behaviour),
        instead of only those to the pod's probe ports."""
        self._node_passes = node_passes
        if self._loaded is not None:
            self._write_config()

    def set_probe_ports(self, probes: Mapping[str, Iterable[int]]) -> None:
        """Make the kernel's probe ports exactly `probes` (pod address, IPv4 or IPv6 -> the TCP ports its own
        probes name): connections from the node to them pass uncaptured, so kubelet probes need no policy.
        Give every address of a dual-stack pod (kubelet probes the primary one, but the node may reach any)."""
        self._require_started()
        want = frozenset((canonical(ip), port) for ip, ports in probes.items() for port in ports)
        table = self._maps["probe_ports"]
        for ip, port in self._probe_ports - want:
            with contextlib.suppress(KeyError):
                del table[ProbePortC.of(ip, port)]
        for ip, port in want - self._probe_ports:
            table[ProbePortC.of(ip, port)] = ctypes.c_uint8(1)
        self._probe_ports = want

    def register_listener(self, kind: Listener, sock: socket.socket) -> None:
        """Give the agent's listener to the SK_LOOKUP program. Optional for plain capture (the tc programs
        find listeners by port); it makes a SYN that meets a TIME_WAIT socket of the agent (client port
        reuse) reach the listener at once instead of via challenge ACK, RST and SYN retransmit, and keeps
        such a SYN away from any other node listener on the original port. The socket serves the families it
        takes: an AF_INET one IPv4, an AF_INET6 one with IPV6_V6ONLY IPv6, a dual-stack one (AF_INET6 on ::,
        IPV6_V6ONLY off: the agent's) both."""
        self._require_started()
        assert self._loaded is not None
        fd = self._loaded.maps["listeners"]
        v6only = sock.family == socket.AF_INET6 and sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
        slots = ([int(kind)] if not v6only else []) + (
            [int(kind) + LISTENER_FAMILY_STRIDE] if sock.family == socket.AF_INET6 else [])
        for slot in slots:
            bpfsys.map_update(fd, slot.to_bytes(4, "little"), sock.fileno().to_bytes(4, "little"))
            self._listeners[slot] = sock
        if self._lookup_link_fd is None:
            with netns_mod.entered(self.netns):
                nsfd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                self._lookup_link_fd = bpfsys.link_create_netns(self._fds[LOOKUP_PROG], nsfd)
            finally:
                os.close(nsfd)

    # -- events and counters ----------------------------------------------------------------------------
    @property
    def events_fd(self) -> int:
        """The ring buffer's fd: readable (level-triggered) while events wait, for an event loop's reader."""
        if self._ring is None:
            raise RedirectError("Redirector not started")
        return self._ring.fd

    def read_events(self, limit: int) -> list[bytes]:
        """Up to ``limit`` waiting events as the kernel wrote them (struct ambit_event: ``FlowEvent.from_bytes``
        decodes one), without waiting."""
        with self._poll_lock:
            return [] if self._ring is None else self._ring.read(limit)

    def poll_events(self, timeout_ms: int = 0) -> list[FlowEvent]:
        """Wait up to timeout_ms for events; return those that arrived, decoded."""
        with self._poll_lock:
            if self._ring is None:
                return []
            records = self._ring.poll(timeout_ms)
        return [FlowEvent.from_bytes(raw) for raw in records]

    def counters(self) -> dict[str, int]:
        """Kernel-side counters summed over CPUs (events_lost = ring-buffer records dropped)."""
        self._require_started()
        table = self._maps["counters"]
        out = {}
        for c in Counter:
            out[c.name.lower()] = sum(int(v.value) for v in table.per_cpu(ctypes.c_uint32(c)))
        assert len(out) == COUNTER_COUNT
        return out

    @property
    def lost_events(self) -> int:
        """Events the kernel could not put in the ring buffer (it was full)."""
        self._require_started()
        return sum(int(v.value) for v in self._maps["counters"].per_cpu(ctypes.c_uint32(Counter.EVENTS_LOST)))

    def enrolled_in_kernel(self) -> dict[str, int]:
        """Pod address -> ifindex as the BPF map holds them (for checks)."""
        return {k.ip: v.ifindex for k, v in self._maps["enrolled"].items()}

    def prog_fd(self, name: str) -> int:
        """File descriptor of a loaded program (ambit_pod_ingress, ambit_uplink_ingress, ambit_sk_lookup)."""
        return self._fds[name]

    def _require_started(self) -> None:
        if self._loaded is None:
            raise RedirectError("Redirector not started")
