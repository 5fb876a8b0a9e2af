/* Ambit traffic capture: types shared by bpf/redirect.c and agent/capture (mirrored with ctypes there).
 *
 * Keep this file and agent/capture/maps.py in sync: field order, sizes and constant values are ABI.
 */
#ifndef AMBIT_REDIRECT_H
#define AMBIT_REDIRECT_H

/* config.flags */
#define AMBIT_F_FAIL_OPEN        (1u << 0) /* no listener: forward captured TCP unchanged instead of dropping */
#define AMBIT_F_LOOKUP_SELECTS   (1u << 1) /* new flows: only mark; the SK_LOOKUP program picks the listener */
#define AMBIT_F_NODE_PASSES      (1u << 2) /* every connection the node itself opens to a pod passes (Istio's
                                            * behaviour); without it only the pod's probe ports pass */

/* Role of an interface (ifaces map value); the SK_LOOKUP program uses it to recognise captured flows. */
#define AMBIT_IF_POD     1 /* host side of an enrolled pod's veth: traffic FROM the pod arrives here */
#define AMBIT_IF_UPLINK  2 /* node uplink: traffic from other nodes arrives here */
#define AMBIT_IF_BRIDGE  3 /* a bridge CNI's bridge (cni0): its ports' pods' TCP is decided here */

/* Listener slots (index into config ports; into the `listeners` sockmap for IPv4 lookups, that plus
 * AMBIT_L_COUNT for IPv6 ones: a dual-stack listener sits in both). */
#define AMBIT_L_OUTBOUND 0 /* 15001 */
#define AMBIT_L_INBOUND  1 /* 15006 */
#define AMBIT_L_HBONE    2 /* 15008 */
#define AMBIT_L_COUNT    3
#define AMBIT_LISTENER_SLOTS (2 * AMBIT_L_COUNT)

/* An address in every map key and event: IPv6 as on the wire, IPv4 as IPv4-mapped IPv6 (::ffff:a.b.c.d), so one
 * key serves both families (Linux drops IPv6 packets with an IPv4-mapped source, and the programs leave alone any
 * IPv6 packet carrying one, so the two never meet). Network byte order. */
struct ambit_addr {
    __be32 w[4];
};

struct ambit_config {
    __u32 flags;        /* AMBIT_F_* */
    __u32 mark;         /* skb mark for captured packets (0x539); 0 = not configured: pass everything */
    __u16 port[AMBIT_L_COUNT]; /* listener ports, host byte order, by AMBIT_L_* */
    __u16 _pad;
};

/* enrolled map: key = a pod address (struct ambit_addr): each address of a dual-stack pod is a key of its own */
struct ambit_pod {
    __u32 ifindex;      /* host-side veth in the node namespace */
    __u32 _pad;
};

/* bridge_ports map: key = ifindex of a pod's veth that is a port of a bridge CNI's bridge (cni0) */
struct ambit_bridge_port {
    __u8 mac[6];        /* the bridge's own address */
    __u16 _pad;
    __u32 ifindex;      /* the bridge's: where the pod's traffic enters the node's IP stack */
};

/* probe_ports map: key = (pod address, TCP port) that the pod's own liveness/readiness/startup probes name;
 * connections from the node itself to them pass uncaptured (kubelet probes). Value unused (1). */
struct ambit_probe_port {
    struct ambit_addr addr;
    __be16 port;
    __u16 _pad;
};

/* flows map (LRU): TCP connections the agent took over, keyed direction-free (lower endpoint first).
 * A packet of such a flow that finds no socket any more (the agent died or closed it) is dropped in
 * fail-closed mode instead of being forwarded in the clear. */
struct ambit_flow_key {
    struct ambit_addr addr_lo;
    struct ambit_addr addr_hi;
    __be16 port_lo;
    __be16 port_hi;
};

struct ambit_flow {
    __u64 created_ns;
    __u16 listener;     /* AMBIT_L_* the first SYN went to */
    __u16 _pad[3];
};

/* Event types */
#define AMBIT_EV_SYN  1 /* SYN or SYN-ACK of a flow we act on */
#define AMBIT_EV_FIN  2
#define AMBIT_EV_RST  3
#define AMBIT_EV_DROP 4 /* a packet was dropped (see reason) */

/* Verdicts */
#define AMBIT_V_REDIRECTED 1 /* new flow assigned to an agent listener */
#define AMBIT_V_STEERED    2 /* packet of an existing agent socket assigned back to it */
#define AMBIT_V_PASSED     3 /* forwarded unchanged (fail-open, or marked for the SK_LOOKUP path) */
#define AMBIT_V_DROPPED    4

/* Drop / pass reasons */
#define AMBIT_R_NONE         0
#define AMBIT_R_NO_LISTENER  1 /* agent listener missing (agent down) */
#define AMBIT_R_ASSIGN_FAIL  2 /* bpf_sk_assign refused the socket */
#define AMBIT_R_STALE_FLOW   3 /* packet of a taken-over flow whose socket is gone */
#define AMBIT_R_FAIL_OPEN    4 /* would have dropped, fail-open setting let it through */
#define AMBIT_R_SPOOFED      5 /* source is an enrolled pod's address, arriving on another interface */
#define AMBIT_R_FRAGMENT     6 /* a TCP fragment to or from an enrolled pod: cannot be captured (ports 0) */

/* Hook that emitted an event */
#define AMBIT_D_POD    0 /* pod veth ingress (outbound traffic and replies to agent upstream sockets) */
#define AMBIT_D_UPLINK 1 /* uplink ingress (inbound traffic) */
#define AMBIT_D_DOOR   2 /* an enrolled pod's door: host veth egress, everything going into the pod */

/* One ring-buffer record, 56 bytes. Addresses (struct ambit_addr: IPv4 as IPv4-mapped) and ports in network
 * byte order as on the wire. */
struct ambit_event {
    __u64 ts_ns;        /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
    struct ambit_addr saddr;
    struct ambit_addr daddr;
    __be16 sport;
    __be16 dport;
    __u32 ifindex;      /* interface the packet arrived on */
    __u8 type;          /* AMBIT_EV_* */
    __u8 tcp_flags;     /* byte 13 of the TCP header: CWR ECE URG ACK PSH RST SYN FIN */
    __u8 hook;          /* AMBIT_D_* */
    __u8 verdict;       /* AMBIT_V_* */
    __u16 listener_port;/* agent port a new flow went to (host order), 0 otherwise */
    __u16 reason;       /* AMBIT_R_* */
};

/* Counters (per-CPU array indices) */
#define AMBIT_C_REDIRECT_OUT   0
#define AMBIT_C_REDIRECT_IN    1
#define AMBIT_C_REDIRECT_HBONE 2
#define AMBIT_C_STEERED        3
#define AMBIT_C_DROP_NO_LISTENER 4
#define AMBIT_C_DROP_STALE     5
#define AMBIT_C_DROP_ASSIGN    6
#define AMBIT_C_FAIL_OPEN      7
#define AMBIT_C_EVENTS_LOST    8
#define AMBIT_C_LOOKUP_SELECTED 9 /* SK_LOOKUP program picked a listener */
#define AMBIT_C_DROP_SPOOFED   10
#define AMBIT_C_REDIRECT_DOOR  11 /* new connections into a pod that only its door saw (DNAT, NodePort, node) */
#define AMBIT_C_PROBE_PASSED   12 /* packets from the node to a pod's probe port, passed uncaptured */
#define AMBIT_C_DROP_FRAGMENT  13 /* TCP fragments to or from an enrolled pod, dropped */
#define AMBIT_C_COUNT          14

#endif
