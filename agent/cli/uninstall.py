"""``ambit uninstall-node``: take everything Ambit put on this node off it, with no agent running.

What istio-cni's uninstall does for its rules: the capture programs on every interface (tc filters and pinned
tcx links), the pin directory, the policy-routing rules and the local route table. Pods go back to plain
networking: nothing of theirs is captured, nothing is dropped. Run it in the node's network namespace (the
agent's, hostNetwork); the agent does the same by itself when it sees its DaemonSet deleted.
"""

from __future__ import annotations

import argparse
import sys

from agent.capture import RedirectError, Redirector


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ambit uninstall-node", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instance", default=None, help="the agent's instance (its node name): names its pin directory")
    ap.add_argument("--bpffs", default="/sys/fs/bpf", help="where bpffs is mounted")
    ap.add_argument("--netns", default=None, help="a named network namespace instead of this one (the lab's nodes)")
    ap.add_argument("--proc-sys", default="/proc/sys", help="the node's /proc/sys (the agent's --proc-sys)")
    args = ap.parse_args(argv)
    try:
        removed = Redirector([], netns=args.netns, bpffs=args.bpffs, instance=args.instance,
                             proc_sys=args.proc_sys).uninstall()
    except (RedirectError, OSError) as e:
        print(f"ambit uninstall-node: {e}", file=sys.stderr)
        return 1
    for line in removed:
        print(f"removed {line}")
    print(f"node clean: {len(removed)} program attachments, the policy-routing rules and route table removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
