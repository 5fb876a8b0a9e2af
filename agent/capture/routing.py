"""Policy routing for captured packets: marked packets coming in are delivered locally.

``100: fwmark 0x539 lookup 100`` + ``local 0.0.0.0/0 dev lo table 100`` delivers the packets the programs
assigned to the agent's sockets; ``99: fwmark 0x539 iif lo goto 32766`` exempts the agent's own marked
packets (its upstream connections), which the first rule would otherwise loop back to the agent.
Installing is idempotent (a crashed agent's rules are kept, not doubled); removing takes every copy.
"""

from __future__ import annotations

import socket
from typing import Any

ROUTE_TABLE = 100
RULE_PRIORITY = 100
MAIN_RULE_PRIORITY = 32766
RT_SCOPE_HOST = 254
RTN_LOCAL = 2


class PolicyRouting:
    def __init__(self, ipr: Any, mark: int, table: int = ROUTE_TABLE, rule_priority: int = RULE_PRIORITY) -> None:
        self._ipr, self.mark, self.table, self.rule_priority = ipr, mark, table, rule_priority

    def _lo(self) -> int:
        return int(self._ipr.link_lookup(ifname="lo")[0])

    def _rule_specs(self) -> list[dict[str, Any]]:
        """Marked packets coming IN are delivered locally (table `table` has `local 0.0.0.0/0 dev lo`);
        the agent's own marked packets (iif lo = locally generated) skip that rule and are routed
        normally (goto the main table's rule, as Istio does), else its upstream connections would loop."""
        mark = {"family": socket.AF_INET, "fwmark": self.mark, "fwmask": 0xFFFFFFFF}
        return [
            {**mark, "priority": self.rule_priority - 1, "iifname": "lo", "action": "FR_ACT_GOTO",
             "goto": MAIN_RULE_PRIORITY},
            {**mark, "priority": self.rule_priority, "table": self.table},
        ]  # fmt: skip

    def _rule_present(self, spec: dict[str, Any]) -> bool:
        for rule in self._ipr.get_rules(family=socket.AF_INET):
            if (
                rule.get_attr("FRA_PRIORITY") == spec["priority"]
                and rule.get_attr("FRA_FWMARK") == self.mark
                and (("goto" in spec) == (rule.get_attr("FRA_GOTO") is not None))
            ):
                return True
        return False

    def _route_present(self) -> bool:
        for r in self._ipr.get_routes(family=socket.AF_INET, table=self.table):
            if r["type"] == RTN_LOCAL and r["dst_len"] == 0:
                return True
        return False

    def install(self) -> None:
        lo = self._lo()
        self._ipr.link("set", index=lo, state="up")
        if not self._route_present():
            self._ipr.route("add", dst="0.0.0.0/0", table=self.table, type=RTN_LOCAL, scope=RT_SCOPE_HOST, oif=lo)
        for spec in self._rule_specs():
            if not self._rule_present(spec):
                self._ipr.rule("add", **spec)

    def remove(self) -> None:
        for spec in self._rule_specs():
            while self._rule_present(spec):
                self._ipr.rule("del", **spec)
        lo = self._lo()
        while self._route_present():
            self._ipr.route("del", dst="0.0.0.0/0", table=self.table, type=RTN_LOCAL, scope=RT_SCOPE_HOST, oif=lo)
