"""The mesh's fixed numbers, shared by capture and proxies (Istio's, so tools and habits carry over)."""

from __future__ import annotations

from dataclasses import dataclass

AGENT_MARK = 0x539  # on the agent's own packets: the programs and policy routing leave them alone


@dataclass(frozen=True)
class Ports:
    """The agent's listener ports."""

    outbound: int = 15001
    inbound: int = 15006
    hbone: int = 15008
