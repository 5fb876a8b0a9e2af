"""The node agent: the composition root that wires capture, proxies, policy, identities and telemetry."""

from agent.node.agent import AgentConfig, NodeAgent

__all__ = ["AgentConfig", "NodeAgent"]
