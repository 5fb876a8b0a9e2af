"""Lab topologies built from network namespaces (nodes, pods, a shared "physical" network)."""

from agent.lab.topology import Lab, Node, Pod

__all__ = ["Lab", "Node", "Pod"]
