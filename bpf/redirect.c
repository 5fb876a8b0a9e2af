/* Ambit transparent capture of enrolled pods' TCP into the node agent's listeners.
 *
 * Programs (loaded by agent/capture through bcc):
 *   ambit_pod_ingress     SCHED_CLS, ingress of the host side of a pod's veth (packets FROM the pod)
 *   ambit_uplink_ingress  SCHED_CLS, ingress of the node's uplink (packets from other nodes)
 *   ambit_pod_egress      SCHED_CLS, egress of the host side of an enrolled pod's veth: the pod's door, which
 *                         every packet INTO the pod crosses, whatever way it came (a Service DNAT on this node,
 *                         a NodePort, the node's own processes, an overlay or any other interface)
 *   ambit_sk_lookup       SK_LOOKUP, attached to the node netns; picks the agent listener for lookups the
 *                         tc programs cannot pre-assign (a SYN that meets a TIME_WAIT socket)
 *
 * Per packet (TCP over IPv4 or IPv6, one code path for both; everything else, UDP/DNS included, passes untouched):
 *   1. mark == config.mark: the agent's own traffic, pass.
 *   2. an existing socket of the node namespace owns the 4-tuple (the agent's accepted socket for a captured
 *      flow, or its IP_TRANSPARENT upstream socket bound to the client pod's address) and the destination is
 *      not a local address (those are delivered to their socket anyway): assign the packet to it and set the
 *      mark, so policy routing (fwmark -> local table) delivers it.
 *   3. a new connection (SYN without ACK) from an enrolled pod (pod hook) or to an enrolled local pod (uplink
 *      hook, door): assign the agent listener 15001 / 15008 (dport 15008) / 15006 and mark; remember the flow.
 *      No listener: drop (fail-closed) unless config.flags has AMBIT_F_FAIL_OPEN.
 *   4. any other packet of a remembered flow whose socket is gone: hand it to the listener (answers
 *      syncookie ACKs / resets) or, with no listener, drop (fail-closed) so nothing leaks in the clear.
 *   5. everything else (pre-enrollment connections, non-enrolled pods, node <-> pod traffic) passes.
 * Before all of it: a packet whose source is an enrolled pod's address arriving on any interface but that
 * pod's own is dropped and counted (source verification).
 *
 * The door: sk_assign works only at tc ingress, so the egress program takes what it must capture back to the
 * ingress of the same veth (bpf_redirect BPF_F_INGRESS, destination MAC := the veth's own), where
 * ambit_pod_ingress recognises it (a packet entering a pod's veth from the node side, addressed to that very
 * pod, can only be a door's) and assigns it as the pod's inbound. Conntrack is reset by the redirect and the
 * assigned packet is marked, so the nft notrack rule keeps it out of conntrack: the Service/NodePort NAT of
 * the first pass stays with the first pass's entry, which also un-NATs the agent's replies. The egress program
 * only takes what the ingress will keep (a SYN when a listener exists; later packets of a flow the agent
 * owns), so a packet never loops between the two. Connections the node itself opens to the pod's probe ports
 * pass (kubelet probes); with AMBIT_F_NODE_PASSES every connection the node opens passes, as in Istio.
 *
 * IPv6: addresses are kept as 16 bytes everywhere (struct ambit_addr, IPv4 as IPv4-mapped), so the maps, the
 * flow table and the events serve both families and a dual-stack pod is enrolled once per address. Only the
 * kernel helpers differ by family: socket lookups take the IPv4 or IPv6 tuple, the agent's listeners are looked
 * up at 127.0.0.1 or ::1 (so a listener bound to 0.0.0.0/127.0.0.1 serves IPv4, one on ::/::1 IPv6, and the
 * agent's dual-stack socket on :: with IPV6_V6ONLY off both), the local-address check asks the IPv6 FIB. IPv6
 * extension headers: hop-by-hop and destination options are skipped, as is a routing header with no segments
 * left (the destination in the header is then the final one), up to AMBIT_IPV6_EXT_MAX of them; a packet with
 * any other (a routing header with segments left, AH, ESP, an unknown one) or with more is left alone
 * (AMBIT_NEXT): the receiver's kernel drops what it cannot process.
 *
 * Fragments: only the first fragment of a packet carries the TCP ports, so a fragment can neither be assigned to
 * a socket nor told apart by flow, and the receiving pod's kernel would reassemble what the programs let by: a
 * connection whose segments are all fragmented on purpose would reach (or leave) an enrolled pod uncaptured.
 * TCP never needs fragments (it sizes segments to the path MTU and sets DF), so every TCP fragment (IPv4 MF or
 * offset, an IPv6 Fragment header followed by TCP or by another extension header) to or from an enrolled pod is
 * dropped and counted, whatever the fail-open setting, as spoofed packets are. Other fragments (UDP: DNS) pass.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/tcp.h>

#include "redirect.h"

#define TCP_FL_FIN 0x01
#define TCP_FL_SYN 0x02
#define TCP_FL_RST 0x04
#define TCP_FL_ACK 0x10
#define LOOPBACK_BE 0x0100007f /* 127.0.0.1 in network byte order (little-endian host) */
#define IP_FRAG_MASK 0x3fff    /* MF flag + fragment offset */
#define AMBIT_IPV6_EXT_MAX 4   /* IPv6 extension headers skipped before TCP, at most */
#define PARSE_OTHER -1         /* parse(): not TCP, or nothing the programs act on */
#define PARSE_FRAGMENT -2      /* parse(): a fragment of a TCP packet; addresses set, ports 0 */

/* Verdicts: a packet we do not act on continues to the next program of the hook (later tcx programs or
 * clsact filters of other tools, e.g. the CNI's); one we assigned to a socket is final. */
#define AMBIT_NEXT TC_ACT_UNSPEC
#define AMBIT_TAKEN TC_ACT_OK

BPF_ARRAY(config, struct ambit_config, 1);
BPF_HASH(enrolled, struct ambit_addr, struct ambit_pod, 16384);
BPF_HASH(ifaces, __u32, __u32, 16384);
BPF_HASH(bridge_ports, __u32, struct ambit_bridge_port, 16384);
BPF_HASH(probe_ports, struct ambit_probe_port, __u8, 65536);
BPF_TABLE("lru_hash", struct ambit_flow_key, struct ambit_flow, flows, 65536);
BPF_PERCPU_ARRAY(counters, __u64, AMBIT_C_COUNT);
#ifndef AMBIT_RINGBUF_PAGES
#define AMBIT_RINGBUF_PAGES 64 /* 256 KiB: 4096 events of 56 bytes + 8 bytes of record header */
#endif
BPF_RINGBUF_OUTPUT(events, AMBIT_RINGBUF_PAGES);
BPF_TABLE("sockmap", __u32, __u32, listeners, AMBIT_LISTENER_SLOTS); /* value: socket fd from user space */

struct pkt {
    struct ambit_addr saddr; /* IPv4 as IPv4-mapped */
    struct ambit_addr daddr;
    __be16 sport;
    __be16 dport;
    __u8 flags;
    __u8 hook;
    __u8 v6;       /* an IPv6 packet */
    __u8 _pad;
    __u32 ifindex; /* skb->ifindex, read once: clang may otherwise keep a ctx pointer the verifier refuses */
};

/* The first 14 bytes of a TCP header: ports and flags. */
struct tcp_head {
    __be16 source;
    __be16 dest;
    __be32 seq;
    __be32 ack_seq;
    __u8 doff;
    __u8 flags;
};

static __always_inline void map_v4(struct ambit_addr *a, __be32 v4)
{
    a->w[0] = 0;
    a->w[1] = 0;
    a->w[2] = bpf_htonl(0xffff);
    a->w[3] = v4;
}

static __always_inline int is_v4_mapped(const struct ambit_addr *a)
{
    return a->w[0] == 0 && a->w[1] == 0 && a->w[2] == bpf_htonl(0xffff);
}

static __always_inline void set_loopback(struct ambit_addr *a, int v6)
{
    if (v6) {
        a->w[0] = 0;
        a->w[1] = 0;
        a->w[2] = 0;
        a->w[3] = bpf_htonl(1);
    } else {
        map_v4(a, LOOPBACK_BE);
    }
}

static __always_inline void count(int idx)
{
    __u64 *v = counters.lookup(&idx);
    if (v)
        (*v)++;
}

static __always_inline void emit(struct __sk_buff *skb, struct pkt *p, __u8 type, __u8 verdict, __u16 lport,
                                 __u16 reason)
{
    struct ambit_event *ev = events.ringbuf_reserve(sizeof(struct ambit_event));
    if (!ev) {
        count(AMBIT_C_EVENTS_LOST);
        return;
    }
    ev->ts_ns = bpf_ktime_get_ns();
    __builtin_memcpy(&ev->saddr, &p->saddr, sizeof(struct ambit_addr));
    __builtin_memcpy(&ev->daddr, &p->daddr, sizeof(struct ambit_addr));
    ev->sport = p->sport;
    ev->dport = p->dport;
    ev->ifindex = p->ifindex;
    ev->type = type;
    ev->tcp_flags = p->flags;
    ev->hook = p->hook;
    ev->verdict = verdict;
    ev->listener_port = lport;
    ev->reason = reason;
    events.ringbuf_submit(ev, 0);
}

/* Report SYN/FIN/RST packets only: per-flow events, not per-packet ones. */
static __always_inline void emit_flags(struct __sk_buff *skb, struct pkt *p, __u8 verdict, __u16 lport)
{
    if (p->flags & TCP_FL_RST)
        emit(skb, p, AMBIT_EV_RST, verdict, lport, AMBIT_R_NONE);
    else if (p->flags & TCP_FL_FIN)
        emit(skb, p, AMBIT_EV_FIN, verdict, lport, AMBIT_R_NONE);
    else if (p->flags & TCP_FL_SYN)
        emit(skb, p, AMBIT_EV_SYN, verdict, lport, AMBIT_R_NONE);
}

/* The `type` at byte `off` of the packet: a pointer into it when it lies in the linear area (the usual case: read
 * in place), else a copy in `buf` (bpf_skb_load_bytes reads a paged skb too); NULL past the packet's end. */
#define HEAD(skb, off, type, buf)                                                                                   \
    ({                                                                                                              \
        void *data_ = (void *)(long)(skb)->data;                                                                    \
        void *end_ = (void *)(long)(skb)->data_end;                                                                 \
        type *h_ = data_ + (off);                                                                                   \
        if ((void *)(h_ + 1) > end_)                                                                                \
            h_ = bpf_skb_load_bytes((skb), (off), (buf), sizeof(type)) ? NULL : (buf);                              \
        h_;                                                                                                         \
    })

/* IPv4: addresses and the offset of the TCP header; PARSE_FRAGMENT for a TCP fragment, PARSE_OTHER for anything
 * else. */
static __always_inline int parse4(struct __sk_buff *skb, struct pkt *p)
{
    struct iphdr buf;
    struct iphdr *ip = HEAD(skb, sizeof(struct ethhdr), struct iphdr, &buf);
    if (!ip || ip->protocol != IPPROTO_TCP)
        return PARSE_OTHER;
    __u32 ihl = (ip->ihl & 0xf) * 4;
    if (ihl < sizeof(struct iphdr))
        return PARSE_OTHER;
    map_v4(&p->saddr, ip->saddr);
    map_v4(&p->daddr, ip->daddr);
    if (ip->frag_off & bpf_htons(IP_FRAG_MASK))
        return PARSE_FRAGMENT;
    return sizeof(struct ethhdr) + ihl;
}

/* IPv6: addresses and the offset of the TCP header past the extension headers that can be skipped safely (see
 * the top of the file); PARSE_FRAGMENT for a TCP fragment; PARSE_OTHER for anything else, and for an IPv4-mapped
 * address in either field. */
static __always_inline int parse6(struct __sk_buff *skb, struct pkt *p)
{
    struct ipv6hdr buf;
    struct ipv6hdr *ip6 = HEAD(skb, sizeof(struct ethhdr), struct ipv6hdr, &buf);
    if (!ip6)
        return PARSE_OTHER;
    __builtin_memcpy(&p->saddr, &ip6->saddr, sizeof(struct ambit_addr));
    __builtin_memcpy(&p->daddr, &ip6->daddr, sizeof(struct ambit_addr));
    if (is_v4_mapped(&p->saddr) || is_v4_mapped(&p->daddr))
        return PARSE_OTHER;
    __u8 next = ip6->nexthdr;
    int off = sizeof(struct ethhdr) + sizeof(struct ipv6hdr);
#pragma unroll
    for (int i = 0; i < AMBIT_IPV6_EXT_MAX; i++) {
        if (next == IPPROTO_TCP)
            return off;
        if (next != IPPROTO_HOPOPTS && next != IPPROTO_DSTOPTS && next != IPPROTO_ROUTING &&
            next != IPPROTO_FRAGMENT)
            return PARSE_OTHER;
        struct ipv6_rt_hdr ext; /* the first 4 bytes; segments_left only means something in a routing header */
        if (bpf_skb_load_bytes(skb, off, &ext, sizeof(ext)))
            return PARSE_OTHER;
        if (next == IPPROTO_FRAGMENT) /* what follows it: TCP, or a header that may hide TCP */
            return ext.nexthdr == IPPROTO_TCP || ext.nexthdr == IPPROTO_HOPOPTS || ext.nexthdr == IPPROTO_DSTOPTS ||
                           ext.nexthdr == IPPROTO_ROUTING || ext.nexthdr == IPPROTO_FRAGMENT
                       ? PARSE_FRAGMENT
                       : PARSE_OTHER;
        if (next == IPPROTO_ROUTING && ext.segments_left)
            return PARSE_OTHER;
        next = ext.nexthdr;
        off += (ext.hdrlen + 1) * 8;
    }
    return next == IPPROTO_TCP ? off : PARSE_OTHER;
}

static __always_inline int parse(struct __sk_buff *skb, struct pkt *p)
{
    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > end)
        return PARSE_OTHER;
    int off;
    if (eth->h_proto == bpf_htons(ETH_P_IP)) {
        off = parse4(skb, p);
    } else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
        p->v6 = 1;
        off = parse6(skb, p);
    } else {
        return PARSE_OTHER;
    }
    p->ifindex = skb->ifindex;
    if (off == PARSE_FRAGMENT)
        return PARSE_FRAGMENT;
    if (off < 0 || off > 0xffff)
        return PARSE_OTHER;
    struct tcp_head buf;
    struct tcp_head *tcp = HEAD(skb, off, struct tcp_head, &buf);
    if (!tcp)
        return PARSE_OTHER;
    p->sport = tcp->source;
    p->dport = tcp->dest;
    p->flags = tcp->flags;
    return 0;
}

/* (a, a_port) < (b, b_port) in a fixed total order (any one does: the flow key only needs both directions of a
 * flow to agree). */
static __always_inline int endpoint_lt(const struct ambit_addr *a, __be16 a_port, const struct ambit_addr *b,
                                       __be16 b_port)
{
#pragma unroll
    for (int i = 0; i < 4; i++) {
        if (a->w[i] != b->w[i])
            return a->w[i] < b->w[i];
    }
    return a_port < b_port;
}

static __always_inline void flow_key(struct pkt *p, struct ambit_flow_key *k)
{
    if (endpoint_lt(&p->saddr, p->sport, &p->daddr, p->dport)) {
        __builtin_memcpy(&k->addr_lo, &p->saddr, sizeof(struct ambit_addr));
        k->port_lo = p->sport;
        __builtin_memcpy(&k->addr_hi, &p->daddr, sizeof(struct ambit_addr));
        k->port_hi = p->dport;
    } else {
        __builtin_memcpy(&k->addr_lo, &p->daddr, sizeof(struct ambit_addr));
        k->port_lo = p->dport;
        __builtin_memcpy(&k->addr_hi, &p->saddr, sizeof(struct ambit_addr));
        k->port_hi = p->sport;
    }
}

/* The socket tuple p->saddr:sport -> daddr:dport of the packet's family; returns its size, which tells the lookup
 * helpers the family. */
static __always_inline __u32 sock_tuple(struct pkt *p, const struct ambit_addr *daddr, __be16 dport,
                                        struct bpf_sock_tuple *t)
{
    if (p->v6) {
        __builtin_memcpy(t->ipv6.saddr, &p->saddr, sizeof(struct ambit_addr));
        __builtin_memcpy(t->ipv6.daddr, daddr, sizeof(struct ambit_addr));
        t->ipv6.sport = p->sport;
        t->ipv6.dport = dport;
        return sizeof(t->ipv6);
    }
    t->ipv4.saddr = p->saddr.w[3];
    t->ipv4.daddr = daddr->w[3];
    t->ipv4.sport = p->sport;
    t->ipv4.dport = dport;
    return sizeof(t->ipv4);
}

/* The agent listener on `port` for the packet's family (looked up at 127.0.0.1 or ::1, so bound there or to the
 * unspecified address; IP_TRANSPARENT), referenced; or NULL. */
static __always_inline struct bpf_sock *find_listener(struct __sk_buff *skb, struct pkt *p, __u16 port)
{
    struct bpf_sock_tuple t = {};
    struct ambit_addr lo;
    set_loopback(&lo, p->v6);
    __u32 size = sock_tuple(p, &lo, bpf_htons(port), &t);
    struct bpf_sock *sk = bpf_sk_lookup_tcp(skb, &t, size, BPF_F_CURRENT_NETNS, 0);
    if (sk && sk->state != BPF_TCP_LISTEN) {
        bpf_sk_release(sk);
        return NULL;
    }
    return sk;
}

/* Is the packet's destination an address of this namespace? Then the normal input path delivers it to its
 * socket anyway (e.g. a pod answering a kubelet probe from the node): no steering, no event. */
static __always_inline int to_local_address(struct __sk_buff *skb, struct pkt *p)
{
    struct bpf_fib_lookup fib = {};
    fib.l4_protocol = IPPROTO_TCP;
    fib.sport = p->sport;
    fib.dport = p->dport;
    if (p->v6) {
        fib.family = AF_INET6;
        __builtin_memcpy(fib.ipv6_src, &p->saddr, sizeof(struct ambit_addr));
        __builtin_memcpy(fib.ipv6_dst, &p->daddr, sizeof(struct ambit_addr));
    } else {
        fib.family = AF_INET;
        fib.ipv4_src = p->saddr.w[3];
        fib.ipv4_dst = p->daddr.w[3];
    }
    fib.ifindex = skb->ingress_ifindex;
    return bpf_fib_lookup(skb, &fib, sizeof(fib), 0) == BPF_FIB_LKUP_RET_NOT_FWDED;
}

static __always_inline int refuse(struct __sk_buff *skb, struct pkt *p, struct ambit_config *cfg, __u16 reason,
                                  int counter)
{
    if (cfg->flags & AMBIT_F_FAIL_OPEN) {
        count(AMBIT_C_FAIL_OPEN);
        if (p->flags & (TCP_FL_SYN | TCP_FL_FIN | TCP_FL_RST))
            emit(skb, p, AMBIT_EV_DROP, AMBIT_V_PASSED, 0, AMBIT_R_FAIL_OPEN);
        return AMBIT_NEXT;
    }
    count(counter);
    emit(skb, p, AMBIT_EV_DROP, AMBIT_V_DROPPED, 0, reason);
    return TC_ACT_SHOT;
}

/* A packet claiming an enrolled pod's address must come from that pod's own interface: anything else (a pod
 * forging a neighbour's address, or the same from another node) is dropped, whatever the fail-open setting,
 * and never captured as that pod. */
static __always_inline int spoofed(struct __sk_buff *skb, struct pkt *p)
{
    struct ambit_pod *src = enrolled.lookup(&p->saddr);
    if (!src || src->ifindex == p->ifindex)
        return 0;
    count(AMBIT_C_DROP_SPOOFED);
    emit(skb, p, AMBIT_EV_DROP, AMBIT_V_DROPPED, 0, AMBIT_R_SPOOFED);
    return 1;
}

static __always_inline struct ambit_config *active_config(struct __sk_buff *skb)
{
    int zero = 0;
    struct ambit_config *cfg = config.lookup(&zero);
    if (!cfg || !cfg->mark || skb->mark == cfg->mark)
        return NULL;
    return cfg;
}

/* A TCP fragment to or from an enrolled pod (see the top of the file) when `concerns`: dropped and counted. */
static __always_inline int fragment(struct __sk_buff *skb, struct pkt *p, int concerns)
{
    if (!concerns || !active_config(skb))
        return AMBIT_NEXT;
    count(AMBIT_C_DROP_FRAGMENT);
    emit(skb, p, AMBIT_EV_DROP, AMBIT_V_DROPPED, 0, AMBIT_R_FRAGMENT);
    return TC_ACT_SHOT;
}

/* Steps 2-4 for a packet of `inbound` (to an enrolled local pod) or outbound (from one) traffic. */
static __always_inline int handle(struct __sk_buff *skb, struct pkt *p, struct ambit_config *cfg, int inbound)
{
    int syn = (p->flags & (TCP_FL_SYN | TCP_FL_ACK)) == TCP_FL_SYN;

    /* 2. existing socket for this exact 4-tuple */
    struct bpf_sock_tuple t = {};
    __u32 size = sock_tuple(p, &p->daddr, p->dport, &t);
    struct bpf_sock *sk = bpf_skc_lookup_tcp(skb, &t, size, BPF_F_CURRENT_NETNS, 0);
    long assigned = -1;
    int time_wait = 0;
    if (sk) {
        if (sk->state == BPF_TCP_TIME_WAIT && syn)
            time_wait = 1; /* port reuse: a new flow, let the kernel's TW_SYN path (and SK_LOOKUP) decide */
        else if (sk->state != BPF_TCP_LISTEN && !to_local_address(skb, p))
            assigned = bpf_sk_assign(skb, sk, 0);
        bpf_sk_release(sk);
    }
    if (assigned == 0) {
        skb->mark = cfg->mark;
        count(AMBIT_C_STEERED);
        emit_flags(skb, p, AMBIT_V_STEERED, 0);
        return AMBIT_TAKEN;
    }
    /* 4. not a new connection: only flows we took over concern us */
    if (!syn) {
        struct ambit_flow_key key = {};
        flow_key(p, &key);
        struct ambit_flow *f = flows.lookup(&key);
        if (!f)
            return AMBIT_NEXT;
        __u32 slot = f->listener;
        if (slot >= AMBIT_L_COUNT)
            return AMBIT_NEXT;
        sk = find_listener(skb, p, cfg->port[slot]);
        if (sk) {
            long err = bpf_sk_assign(skb, sk, 0);
            bpf_sk_release(sk);
            if (!err) {
                skb->mark = cfg->mark;
                emit_flags(skb, p, AMBIT_V_STEERED, cfg->port[slot]);
                return AMBIT_TAKEN;
            }
        }
        return refuse(skb, p, cfg, AMBIT_R_STALE_FLOW, AMBIT_C_DROP_STALE);
    }

    /* 3. new connection */
    __u32 slot = AMBIT_L_OUTBOUND;
    int counter = AMBIT_C_REDIRECT_OUT;
    if (inbound) {
        slot = p->dport == bpf_htons(cfg->port[AMBIT_L_HBONE]) ? AMBIT_L_HBONE : AMBIT_L_INBOUND;
        counter = slot == AMBIT_L_HBONE ? AMBIT_C_REDIRECT_HBONE : AMBIT_C_REDIRECT_IN;
    }
    __u16 lport = cfg->port[slot];
    sk = find_listener(skb, p, lport);
    if (!sk)
        return refuse(skb, p, cfg, AMBIT_R_NO_LISTENER, AMBIT_C_DROP_NO_LISTENER);
    long err = 0;
    if (p->hook == AMBIT_D_DOOR)
        counter = AMBIT_C_REDIRECT_DOOR;
    if (time_wait || (cfg->flags & AMBIT_F_LOOKUP_SELECTS))
        err = 0; /* only mark: the socket lookup (SK_LOOKUP program) picks the listener */
    else
        err = bpf_sk_assign(skb, sk, 0);
    bpf_sk_release(sk);
    if (err)
        return refuse(skb, p, cfg, AMBIT_R_ASSIGN_FAIL, AMBIT_C_DROP_ASSIGN);

    skb->mark = cfg->mark;
    struct ambit_flow_key key = {};
    struct ambit_flow val = {};
    flow_key(p, &key);
    val.created_ns = bpf_ktime_get_ns();
    val.listener = slot;
    flows.update(&key, &val);
    count(counter);
    emit(skb, p, AMBIT_EV_SYN, AMBIT_V_REDIRECTED, lport, AMBIT_R_NONE);
    return AMBIT_TAKEN;
}

/* A pod's veth that is a port of a bridge CNI's bridge (cni0): a socket assigned here does not survive the
 * bridge handing the frame up, and frames between pods of one bridge never reach the node's IP stack at all.
 * So TCP that concerns an enrolled pod is sent up to the bridge's own IP stack (destination MAC := the
 * bridge's), where the same program, attached to the bridge, decides exactly as on a routed pod's veth. */
static __always_inline int via_bridge(struct __sk_buff *skb, struct pkt *p, struct ambit_bridge_port *port)
{
    int zero = 0;
    struct ambit_config *cfg = config.lookup(&zero);
    if (!cfg || !cfg->mark || skb->mark == cfg->mark)
        return AMBIT_NEXT;
    if (enrolled.lookup(&p->saddr) || enrolled.lookup(&p->daddr))
        bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_dest), port->mac, ETH_ALEN, 0);
    return AMBIT_NEXT;
}

/* Whose traffic is a packet from a pod? The pod's own (outbound) when it is enrolled; else, when it calls an
 * enrolled pod of this node, that pod's inbound, captured whatever its source (as Istio's ambient does), so
 * that STRICT and policy apply to it too. Returns -1 when neither end is an enrolled pod of this node. */
static __always_inline int pod_direction(struct pkt *p)
{
    if (enrolled.lookup(&p->saddr))
        return 0;
    return enrolled.lookup(&p->daddr) ? 1 : -1;
}

/* A packet coming back from the door (see the top of the file): addressed to the enrolled pod whose veth it
 * enters from the node side. */
static __always_inline int from_door(__u32 ifindex, struct pkt *p)
{
    struct ambit_pod *pod = enrolled.lookup(&p->daddr);
    return pod && pod->ifindex == ifindex;
}

/* The same on a bridge CNI: a marked packet entering the bridge's stack, addressed to an enrolled pod on one of
 * its ports (nothing else arrives there marked: the agent's own packets to such a pod leave through the bridge).
 * The configuration when it is one, else NULL. */
static __always_inline struct ambit_config *from_bridge_door(struct __sk_buff *skb, __u32 bridge_ifindex,
                                                             struct pkt *p)
{
    int zero = 0;
    struct ambit_config *cfg = config.lookup(&zero);
    if (!cfg || !cfg->mark || skb->mark != cfg->mark)
        return NULL;
    struct ambit_pod *pod = enrolled.lookup(&p->daddr);
    if (!pod)
        return NULL;
    __u32 port_ifindex = pod->ifindex;
    struct ambit_bridge_port *port = bridge_ports.lookup(&port_ifindex);
    return port && port->ifindex == bridge_ifindex ? cfg : NULL;
}

/* A packet the door took must be kept: handed back to the stack it would go to the door again. */
static __always_inline int door_verdict(int verdict)
{
    return verdict == AMBIT_NEXT ? TC_ACT_SHOT : verdict;
}

int ambit_pod_ingress(struct __sk_buff *skb)
{
    struct pkt p = {.hook = AMBIT_D_POD};
    int parsed = parse(skb, &p);
    if (parsed == PARSE_FRAGMENT)
        return fragment(skb, &p, pod_direction(&p) >= 0);
    if (parsed)
        return AMBIT_NEXT;
    __u32 ifindex = p.ifindex;
    struct ambit_bridge_port *port = bridge_ports.lookup(&ifindex);
    if (port)
        return spoofed(skb, &p) ? TC_ACT_SHOT : via_bridge(skb, &p, port);
    __u32 *role = ifaces.lookup(&ifindex);
    int bridge = role && *role == AMBIT_IF_BRIDGE;
    struct ambit_config *cfg = bridge ? from_bridge_door(skb, ifindex, &p) : NULL;
    if (cfg) {
        p.hook = AMBIT_D_DOOR;
        return door_verdict(handle(skb, &p, cfg, 1));
    }
    cfg = active_config(skb);
    if (!cfg)
        return AMBIT_NEXT;
    if (from_door(ifindex, &p)) {
        p.hook = AMBIT_D_DOOR;
        return door_verdict(handle(skb, &p, cfg, 1));
    }
    if (!bridge && spoofed(skb, &p)) /* the bridge's ports checked already */
        return TC_ACT_SHOT;
    int inbound = pod_direction(&p);
    if (inbound < 0)
        return AMBIT_NEXT;
    return handle(skb, &p, cfg, inbound);
}

int ambit_uplink_ingress(struct __sk_buff *skb)
{
    struct pkt p = {.hook = AMBIT_D_UPLINK};
    int parsed = parse(skb, &p);
    if (parsed == PARSE_FRAGMENT)
        return fragment(skb, &p, enrolled.lookup(&p.daddr) || enrolled.lookup(&p.saddr));
    if (parsed)
        return AMBIT_NEXT;
    if (spoofed(skb, &p))
        return TC_ACT_SHOT;
    struct ambit_config *cfg = active_config(skb);
    if (!cfg || !enrolled.lookup(&p.daddr))
        return AMBIT_NEXT;
    return handle(skb, &p, cfg, 1);
}

/* Does the agent own this packet's flow (a socket for its 4-tuple, or the flow table remembers it)? */
static __always_inline int agent_flow(struct __sk_buff *skb, struct pkt *p)
{
    struct bpf_sock_tuple t = {};
    __u32 size = sock_tuple(p, &p->daddr, p->dport, &t);
    struct bpf_sock *sk = bpf_skc_lookup_tcp(skb, &t, size, BPF_F_CURRENT_NETNS, 0);
    if (sk) {
        int listening = sk->state == BPF_TCP_LISTEN;
        bpf_sk_release(sk);
        if (!listening)
            return 1;
    }
    struct ambit_flow_key key = {};
    flow_key(p, &key);
    return flows.lookup(&key) != NULL;
}

/* The node itself calls the pod: kubelet probes of the pod's own probe ports pass (or everything, with
 * AMBIT_F_NODE_PASSES). A packet the node sends carries its socket; a forwarded one does not. */
static __always_inline int node_probe(struct __sk_buff *skb, struct pkt *p, struct ambit_config *cfg)
{
    if (!skb->sk)
        return 0;
    if (cfg->flags & AMBIT_F_NODE_PASSES)
        return 1;
    struct ambit_probe_port key = {};
    __builtin_memcpy(&key.addr, &p->daddr, sizeof(struct ambit_addr));
    key.port = p->dport;
    if (!probe_ports.lookup(&key))
        return 0;
    count(AMBIT_C_PROBE_PASSED);
    return 1;
}

int ambit_pod_egress(struct __sk_buff *skb)
{
    struct pkt p = {.hook = AMBIT_D_DOOR};
    int parsed = parse(skb, &p);
    if (parsed == PARSE_FRAGMENT)
        return fragment(skb, &p, enrolled.lookup(&p.daddr) != NULL);
    if (parsed)
        return AMBIT_NEXT;
    struct ambit_config *cfg = active_config(skb);
    if (!cfg)
        return AMBIT_NEXT;
    struct ambit_pod *pod = enrolled.lookup(&p.daddr);
    if (!pod || pod->ifindex != p.ifindex)
        return AMBIT_NEXT;
    /* Source verification for what the node forwards from interfaces without a pod program (overlays):
     * a local enrolled pod's own traffic comes in on its own veth (on a bridge CNI, through the bridge), where
     * it is captured. */
    struct ambit_pod *src = enrolled.lookup(&p.saddr);
    if (src && !skb->sk && src->ifindex != skb->ingress_ifindex) {
        __u32 src_ifindex = src->ifindex;
        struct ambit_bridge_port *via = bridge_ports.lookup(&src_ifindex);
        if (!via || via->ifindex != skb->ingress_ifindex) {
            count(AMBIT_C_DROP_SPOOFED);
            emit(skb, &p, AMBIT_EV_DROP, AMBIT_V_DROPPED, 0, AMBIT_R_SPOOFED);
            return TC_ACT_SHOT;
        }
    }
    if (node_probe(skb, &p, cfg))
        return AMBIT_NEXT;
    __u32 ifindex = p.ifindex;
    struct ambit_bridge_port *bridge = bridge_ports.lookup(&ifindex);
    if ((p.flags & (TCP_FL_SYN | TCP_FL_ACK)) == TCP_FL_SYN) {
        __u16 lport = cfg->port[p.dport == bpf_htons(cfg->port[AMBIT_L_HBONE]) ? AMBIT_L_HBONE : AMBIT_L_INBOUND];
        struct bpf_sock *sk = find_listener(skb, &p, lport);
        if (!sk)
            return refuse(skb, &p, cfg, AMBIT_R_NO_LISTENER, AMBIT_C_DROP_NO_LISTENER);
        bpf_sk_release(sk);
    } else if (!agent_flow(skb, &p)) {
        return AMBIT_NEXT; /* a connection made before enrollment, or a probe's */
    }
    /* Back in through the veth: addressed to the veth itself (routed CNIs: ambit_pod_ingress recognises the door
     * there), or on a bridge CNI's port to the bridge, which hands it up to its IP stack, where the pod program
     * attached to the bridge recognises it by the mark (from_bridge_door). The mark also keeps it out of
     * conntrack when the bridge's frames meet netfilter (br_netfilter, which Kubernetes requires of bridge
     * CNIs): tracked there, it would clash with the connection's entry from its first pass (a Service's DNAT).
     * The bridge learns the source address of what enters its port: the pod's own, not the sender's (which
     * would send the sender's later frames to this port). */
    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > end)
        return TC_ACT_SHOT;
    struct {
        __u8 dest[ETH_ALEN];
        __u8 source[ETH_ALEN];
    } macs;
    if (bridge) {
        __builtin_memcpy(macs.dest, bridge->mac, ETH_ALEN);
        __builtin_memcpy(macs.source, eth->h_dest, ETH_ALEN);
    } else {
        __builtin_memcpy(macs.dest, eth->h_source, ETH_ALEN);
        __builtin_memcpy(macs.source, eth->h_source, ETH_ALEN);
    }
    if (bpf_skb_store_bytes(skb, 0, &macs, sizeof(macs), 0))
        return TC_ACT_SHOT;
    if (bridge)
        skb->mark = cfg->mark;
    return bpf_redirect(ifindex, BPF_F_INGRESS);
}

/* Listener lookups in the node namespace that the tc programs left to the kernel (SYN meeting a TIME_WAIT
 * socket, or every new flow with AMBIT_F_LOOKUP_SELECTS): choose the agent listener from the sockmap. */
int ambit_sk_lookup(struct bpf_sk_lookup *ctx)
{
    if (ctx->protocol != IPPROTO_TCP)
        return SK_PASS;
    struct ambit_addr remote, local;
    __u32 family_slots;
    if (ctx->family == AF_INET) {
        map_v4(&remote, ctx->remote_ip4);
        map_v4(&local, ctx->local_ip4);
        family_slots = 0;
    } else if (ctx->family == AF_INET6) {
        remote.w[0] = ctx->remote_ip6[0];
        remote.w[1] = ctx->remote_ip6[1];
        remote.w[2] = ctx->remote_ip6[2];
        remote.w[3] = ctx->remote_ip6[3];
        local.w[0] = ctx->local_ip6[0];
        local.w[1] = ctx->local_ip6[1];
        local.w[2] = ctx->local_ip6[2];
        local.w[3] = ctx->local_ip6[3];
        family_slots = AMBIT_L_COUNT;
    } else {
        return SK_PASS;
    }
    int zero = 0;
    struct ambit_config *cfg = config.lookup(&zero);
    if (!cfg || !cfg->mark)
        return SK_PASS;
    struct ambit_addr lo;
    set_loopback(&lo, family_slots != 0);
    if (local.w[0] == lo.w[0] && local.w[1] == lo.w[1] && local.w[2] == lo.w[2] && local.w[3] == lo.w[3])
        return SK_PASS; /* the tc programs' own listener probes: answer them from the normal tables */
    __u32 ifindex = ctx->ingress_ifindex;
    __u32 *role = ifaces.lookup(&ifindex);
    if (!role)
        return SK_PASS;

    __u32 slot;
    if (*role == AMBIT_IF_POD) {
        struct ambit_pod *pod = enrolled.lookup(&remote);
        if (pod && pod->ifindex == ifindex) {
            slot = AMBIT_L_OUTBOUND;
        } else {
            pod = enrolled.lookup(&local); /* came back from the pod's door */
            if (!pod || pod->ifindex != ifindex)
                return SK_PASS;
            slot = ctx->local_port == cfg->port[AMBIT_L_HBONE] ? AMBIT_L_HBONE : AMBIT_L_INBOUND;
        }
    } else if (*role == AMBIT_IF_UPLINK) {
        if (!enrolled.lookup(&local))
            return SK_PASS;
        slot = ctx->local_port == cfg->port[AMBIT_L_HBONE] ? AMBIT_L_HBONE : AMBIT_L_INBOUND;
    } else {
        return SK_PASS;
    }
    slot += family_slots;

    /* Slot empty (listener not registered or closed): normal lookup. Fail-closed needs nothing here: the
     * tc programs already dropped the SYN if no listener exists on the agent's port. */
    struct bpf_sock *sk = (struct bpf_sock *)listeners.lookup(&slot);
    if (!sk)
        return SK_PASS;
    long err = bpf_sk_assign(ctx, sk, 0);
    bpf_sk_release(sk);
    if (!err)
        count(AMBIT_C_LOOKUP_SELECTED);
    return SK_PASS;
}
