"""Policy routing for captured packets: marked packets coming in are delivered locally, for IPv4 and IPv6.

Per family: ``100: fwmark 0x539 lookup 100`` + ``local 0.0.0.0/0 dev lo table 100`` (IPv6: ``local ::/0 dev lo
table 100``) delivers the packets the programs assigned to the agent's sockets; ``99: fwmark 0x539 iif lo goto
32766`` exempts the agent's own marked packets (its upstream connections), which the first rule would otherwise
loop back to the agent (32766 is the main table's rule in both families).
Installing is idempotent (a crashed agent's rules are kept, not doubled); removing takes every copy.

IPv6 is set up only where the namespace has it: a kernel without IPv6 (``ipv6.disable=1``: the family is not
supported) or a namespace whose loopback has it disabled (``disable_ipv6``, where the kernel refuses the local
route) gets the IPv4 half alone, logged; no IPv6 packet can then reach the node's sockets anyway.
"""

from __future__ import annotations

import errno
import logging
import socket

from agent.capture.rtnl import RTN_LOCAL, Rtnl, Rule

log = logging.getLogger(__name__)

ROUTE_TABLE = 100
RULE_PRIORITY = 100
MAIN_RULE_PRIORITY = 32766
FAMILIES = (socket.AF_INET, socket.AF_INET6)
IPV6_UNAVAILABLE = (errno.EAFNOSUPPORT, errno.EACCES)  # no IPv6 in the kernel; IPv6 disabled on lo


def _unavailable(e: OSError) -> bool:
    """Is this netlink error the kernel saying the namespace has no IPv6?"""
    return e.errno in IPV6_UNAVAILABLE


class PolicyRouting:
    def __init__(self, rtnl: Rtnl, mark: int, table: int = ROUTE_TABLE, rule_priority: int = RULE_PRIORITY) -> None:
        self._rtnl, self.mark, self.table, self.rule_priority = rtnl, mark, table, rule_priority

    def _lo(self) -> int:
        return self._rtnl.link(name="lo").index

    def rules(self, family: int) -> list[Rule]:
        """Marked packets coming IN are delivered locally (table `table` has `local <any> dev lo`);
        the agent's own marked packets (iif lo = locally generated) skip that rule and are routed
        normally (goto the main table's rule, as Istio does), else its upstream connections would loop."""
        return [
            Rule(family, self.rule_priority - 1, self.mark, 0xFFFFFFFF, iifname="lo", goto=MAIN_RULE_PRIORITY),
            Rule(family, self.rule_priority, self.mark, 0xFFFFFFFF, table=self.table),
        ]

    def _rule_present(self, rule: Rule) -> bool:
        return any(r.priority == rule.priority and r.fwmark == self.mark and bool(r.goto) == bool(rule.goto)
                   for r in self._rtnl.rules(rule.family))

    def _route_present(self, family: int) -> bool:
        return any(r.type == RTN_LOCAL and r.dst_len == 0 for r in self._rtnl.routes(family, self.table))

    def install(self) -> None:
        """Set up both families where the namespace has them."""
        lo = self._lo()
        self._rtnl.set_up(lo)
        for family in FAMILIES:
            try:
                if not self._route_present(family):
                    self._rtnl.local_route(True, family, self.table, lo)
                for rule in self.rules(family):
                    if not self._rule_present(rule):
                        self._rtnl.rule(True, rule)
            except OSError as e:
                if family != socket.AF_INET6 or not _unavailable(e):
                    raise
                log.info("IPv6 unavailable in this namespace (%s): IPv6 is not captured", e)

    def remove(self) -> None:
        lo = self._lo()
        for family in FAMILIES:
            try:
                for rule in self.rules(family):
                    while self._rule_present(rule):
                        self._rtnl.rule(False, rule)
                while self._route_present(family):
                    self._rtnl.local_route(False, family, self.table, lo)
            except OSError as e:
                if family != socket.AF_INET6 or not _unavailable(e):
                    raise
