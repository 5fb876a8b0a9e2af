"""Flows: what a node agent saw, kept for readers (``ambit observe``) in Hubble's shape.

- ``model``     the in-memory flow record (``Flow``, ``Endpoint``, ``LostEvent``) and its protobuf form
- ``observer.proto``  the Flow messages and the Observer service (package ambit.observer.v1)
- ``filters``   FlowFilter -> predicate, with Hubble's AND / OR / allow-minus-deny semantics
- ``ring``      the last N flows, and followers with bounded queues (losses are reported, never silent)
- ``recorder``  ``FlowRecorder``: what the agent calls (start/end, drop, kernel events, lost kernel events)
- ``kernel``    the kernel's events in telemetry's terms (``KernelRecords``: raw records, described by kind)
- ``kernel_reader``  ``KernelReader``: the kernel's ring buffer read on the event loop, in batches
- ``observer``  ``ObserverServer``: GetFlows and ServerStatus over gRPC (``agent.rpc``), on a unix socket and/or TCP
- ``observer_tls``  who may read flows over TCP: mutual TLS with the operator's certificate
- ``printer``   the output formats of ``ambit observe`` (agent/cli/observe.py)

Wiring in an agent (metrics and admin endpoints live in agent/telemetry/metrics.py and agent/telemetry/admin.py)::

    metrics = Metrics()
    recorder = FlowRecorder(node, capacity=4096, metrics=metrics, resolve=endpoint_of_ip)
    observer = ObserverServer(recorder)
    await observer.start(unix_path=observer_socket)     # TCP too: tcp="0.0.0.0:4244", tls=ServerTls(...)
    admin = AdminServer(metrics, ready=readiness, config_dump=config_dump)
    await admin.start()
    reader = KernelReader(KernelEvents(redirector), recorder)   # on the running loop (node glue: KernelEvents)

This package's __init__ imports nothing, so the CLI does not pay for the agent's modules.
"""
