"""Keeping the packets the programs steer to the agent out of conntrack, so that NAT never rewrites them.

tc ingress runs before netfilter, but assigning a packet to a socket does not exempt it from netfilter: on a
node with kube-proxy, the nat PREROUTING DNAT of a Service VIP still rewrites a captured SYN to an endpoint's
address, the listener's request socket is keyed by that address, and the handshake's ACK (steered by the VIP
tuple) meets the listener, which resets. The agent resolves VIPs itself (ztunnel's own DNAT), so what it
steers (the packets carrying its mark) skips conntrack from the raw priority on: one nftables table,
``inet ambit`` (the inet family: IPv4 and IPv6 alike), written and removed whole (``nft``; idempotent).
"""

from __future__ import annotations

import os

from agent.capture import netns as netns_mod

TABLE = "ambit"


def ruleset(mark: int) -> str:
    return (f"table inet {TABLE}\n"
            f"delete table inet {TABLE}\n"
            f"table inet {TABLE} {{\n"
            f"  chain steered {{\n"
            f"    type filter hook prerouting priority raw; policy accept;\n"
            f"    meta mark {mark:#x} notrack\n"
            f"  }}\n"
            f"}}\n")


def available() -> bool:
    # not shutil.which: shutil brings bz2 and lzma into the agent for this one call
    return any(os.access(os.path.join(d, "nft"), os.X_OK) for d in os.get_exec_path())


def install(netns: str | None, mark: int) -> None:
    """Write the table (replacing any earlier one in one transaction). OSError names what went wrong."""
    out = netns_mod.run(netns, ["nft", "-f", "-"], input=ruleset(mark), check=False)
    if out.returncode != 0:
        raise OSError(f"nft could not write table inet {TABLE}: {out.stderr.strip()}")


def remove(netns: str | None) -> None:
    """Delete the table if it is there."""
    out = netns_mod.run(netns, ["nft", "list", "tables"], check=False)
    if f"table inet {TABLE}" in out.stdout.splitlines():
        netns_mod.run(netns, ["nft", "delete", "table", "inet", TABLE])
