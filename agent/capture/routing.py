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
from typing import Any

log = logging.getLogger(__name__)

ROUTE_TABLE = 100
RULE_PRIORITY = 100
MAIN_RULE_PRIORITY = 32766
RT_SCOPE_HOST = 254
RTN_LOCAL = 2
FAMILIES = (socket.AF_INET, socket.AF_INET6)
ANY: dict[int, str] = {socket.AF_INET: "0.0.0.0/0", socket.AF_INET6: "::/0"}
IPV6_UNAVAILABLE = (errno.EAFNOSUPPORT, errno.EACCES)  # no IPv6 in the kernel; IPv6 disabled on lo


def _unavailable(e: Exception) -> bool:
    """Is this netlink error the kernel saying the namespace has no IPv6?"""
    return getattr(e, "code", None) in IPV6_UNAVAILABLE


class PolicyRouting:
    def __init__(self, ipr: Any, mark: int, table: int = ROUTE_TABLE, rule_priority: int = RULE_PRIORITY) -> None:
        self._ipr, self.mark, self.table, self.rule_priority = ipr, mark, table, rule_priority

    def _lo(self) -> int:
        return int(self._ipr.link_lookup(ifname="lo")[0])

    def _rule_specs(self, family: int) -> list[dict[str, Any]]:
        """Marked packets coming IN are delivered locally (table `table` has `local <any> dev lo`);
        the agent's own marked packets (iif lo = locally generated) skip that rule and are routed
        normally (goto the main table's rule, as Istio does), else its upstream connections would loop."""
        mark = {"family": family, "fwmark": self.mark, "fwmask": 0xFFFFFFFF}
        return [
            {**mark, "priority": self.rule_priority - 1, "iifname": "lo", "action": "FR_ACT_GOTO",
             "goto": MAIN_RULE_PRIORITY},
            {**mark, "priority": self.rule_priority, "table": self.table},
        ]  # fmt: skip

    def _rule_present(self, spec: dict[str, Any]) -> bool:
        for rule in self._ipr.get_rules(family=spec["family"]):
            if (
                rule.get_attr("FRA_PRIORITY") == spec["priority"]
                and rule.get_attr("FRA_FWMARK") == self.mark
                and (("goto" in spec) == (rule.get_attr("FRA_GOTO") is not None))
            ):
                return True
        return False

    def _route_present(self, family: int) -> bool:
        for r in self._ipr.get_routes(family=family, table=self.table):
            if r["type"] == RTN_LOCAL and r["dst_len"] == 0:
                return True
        return False

    def _local_route(self, command: str, family: int, lo: int) -> None:
        self._ipr.route(command, family=family, dst=ANY[family], table=self.table, type=RTN_LOCAL,
                        scope=RT_SCOPE_HOST, oif=lo)

    def install(self) -> None:
        """Set up both families where the namespace has them."""
        lo = self._lo()
        self._ipr.link("set", index=lo, state="up")
        for family in FAMILIES:
            try:
                if not self._route_present(family):
                    self._local_route("add", family, lo)
            except Exception as e:  # pyroute2's NetlinkError carries the kernel's errno as .code
                if family != socket.AF_INET6 or not _unavailable(e):
                    raise
                log.info("IPv6 unavailable in this namespace (%s): IPv6 is not captured", e)
                continue
            for spec in self._rule_specs(family):
                if not self._rule_present(spec):
                    self._ipr.rule("add", **spec)

    def remove(self) -> None:
        lo = self._lo()
        for family in FAMILIES:
            try:
                for spec in self._rule_specs(family):
                    while self._rule_present(spec):
                        self._ipr.rule("del", **spec)
                while self._route_present(family):
                    self._local_route("del", family, lo)
            except Exception as e:  # pyroute2's NetlinkError carries the kernel's errno as .code
                if family != socket.AF_INET6 or not _unavailable(e):
                    raise
