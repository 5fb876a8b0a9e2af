"""Capture: the eBPF programs (bpf/redirect.c) that hand enrolled pods' TCP to the agent, and their manager.

- ``programs``    compile and load bpf/redirect.c through bcc
- ``redirector``  ``Redirector``: attach to pods and uplinks, fill the maps, reconcile, kernel events
- ``attach``      tcx links (pinned) or clsact filters
- ``routing``     policy routing that delivers the captured packets locally
- ``links``       which host interface leads to a pod (rtnetlink)
- ``maps``        Python mirrors of bpf/redirect.h
- ``bpfsys``      the bpf() syscalls bcc does not wrap
- ``netns``       running code inside a named network namespace
"""

from agent.capture.links import host_ifname_for
from agent.capture.maps import EventType, FlowEvent, Hook, Listener, Reason, Verdict
from agent.capture.programs import RedirectError
from agent.capture.redirector import ReconcileResult, Redirector

__all__ = [
    "EventType",
    "FlowEvent",
    "Hook",
    "Listener",
    "Reason",
    "ReconcileResult",
    "RedirectError",
    "Redirector",
    "Verdict",
    "host_ifname_for",
]
