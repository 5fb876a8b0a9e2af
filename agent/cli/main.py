"""The ``ambit`` command: one entry point for Ambit's tools.

    ambit lab up|down|status|exec|label|agent ...   a cluster of network namespaces on this machine
    ambit agent run ...     the node agent (what the DaemonSet runs)
    ambit status            each agent's view: enrolled pods, certificates, policies in force
    ambit policy explain SRC DST:PORT   which policy and rule would decide a connection
    ambit observe ...       the agents' flows, filtered and merged (like hubble observe)
    ambit ca ...            Ambit's CA (see ``ambit ca --help``)
    ambit hbone serve|forward ...   a standalone HBONE server or forwarder
    ambit uninstall-node    take Ambit's programs, rules and routes off this node (no agent running)
    ambit demo              the demo that ``make demo`` runs
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from agent import __main__ as agent_main
from agent.ca import __main__ as ca_main
from agent.cli import demo, uninstall
from agent.cli import observe as observe_cli
from agent.cli import status as status_cli
from agent.lab import cli as lab_cli
from hbone import __main__ as hbone_main

COMMANDS: dict[str, Callable[[list[str]], int | None]] = {
    "ca": ca_main.main,
    "hbone": hbone_main.main,
    "demo": lambda _argv: demo.run(),
    "lab": lab_cli.main,
    "agent": agent_main.main,
    "status": status_cli.status_main,
    "policy": status_cli.policy_main,
    "observe": observe_cli.main,
    "uninstall-node": uninstall.main,
}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help") or args[0] not in COMMANDS:
        print(__doc__.strip(), file=sys.stderr if args and args[0] not in ("-h", "--help") else sys.stdout)
        if args and args[0] not in ("-h", "--help"):
            print(f"\nambit: unknown command {args[0]!r}", file=sys.stderr)
            return 2
        return 0
    return COMMANDS[args[0]](args[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
