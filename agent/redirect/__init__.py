"""Kernel side of traffic capture: eBPF programs (bpf/redirect.c) and their manager."""

from agent.redirect.manager import (
    AGENT_MARK,
    Ports,
    ReconcileResult,
    RedirectError,
    Redirector,
    host_ifname_for,
)
from agent.redirect.maps import EventType, FlowEvent, Hook, Listener, Reason, Verdict

__all__ = [
    "AGENT_MARK",
    "EventType",
    "FlowEvent",
    "Hook",
    "Listener",
    "Ports",
    "Reason",
    "ReconcileResult",
    "RedirectError",
    "Redirector",
    "Verdict",
    "host_ifname_for",
]
