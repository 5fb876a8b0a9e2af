"""What the agent's memory is made of (issue 11): the marginal cost of each of its imports, and an idle agent's
memory in a lab with N enrolled pods.

    python -m bench.agent_memory imports [--runs 3]
    python -m bench.agent_memory lab --pods 100 [--settle 10]      (root: builds a 1-node lab)

``imports``: the agent's import graph (``import agent.__main__``) is recorded once in a fresh interpreter, in the
order modules enter ``sys.modules``, and grouped: a third-party package or a stdlib top-level module is one group,
the agent's own code is grouped by its sub-package (``agent.capture``, ``hbone``...). Then, in another fresh
interpreter, each group's modules are imported in the order the group first appears, and /proc/self/smaps_rollup is
read after each group: a group is charged what its modules add, including the stdlib modules they pull in first.
Figures are PSS, RSS and anonymous memory in KiB (PSS depends on what other processes share the same files:
anonymous memory does not).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROLLUP_FIELDS = ("Pss", "Rss", "Anonymous")

_MEASURE = r"""
import importlib, json, sys
from pathlib import Path

def rollup():
    fields = dict(line.split(":", 1) for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:])
    return {k: int(fields[k].split()[0]) for k in ("Pss", "Rss", "Anonymous")}

groups = json.loads(sys.stdin.read())
rows = [("interpreter", rollup(), len(sys.modules))]
for name, modules in groups:
    for m in modules:
        if m not in sys.modules:
            try:
                importlib.import_module(m)
            except ImportError:
                pass  # a module a package imports under another name, or only on some platforms
    rows.append((name, rollup(), len(sys.modules)))
print(json.dumps(rows))
"""


FIRST_PARTY = ("agent", "hbone")


def group_of(module: str) -> str:
    """The group a module is charged to: the agent's own code by sub-package, the standard library as one group,
    anything else by its top-level package."""
    parts = module.split(".")
    if parts[0] in FIRST_PARTY:
        return ".".join(parts[:2]) if parts[0] == "agent" and len(parts) > 1 and parts[1] != "__main__" else parts[0]
    return "stdlib" if parts[0] in sys.stdlib_module_names else parts[0]


def import_tree(importtime: str) -> list[tuple[str, str | None]]:
    """(module, the module whose import imported it, None at the top) from ``-X importtime`` output, in the
    order imports completed (children before their parent)."""
    rows = []
    for line in importtime.splitlines():
        m = re.fullmatch(r"import time:\s+\d+ \|\s+\d+ \|( *)(\S+)", line)
        if m:
            rows.append((len(m.group(1)) // 2, m.group(2)))
    tree: list[tuple[str, str | None]] = []
    for i, (level, name) in enumerate(rows):
        parent = next((n for lv, n in rows[i + 1:] if lv < level), None)
        tree.append((name, parent))
    return tree


def import_steps(tree: Sequence[tuple[str, str | None]]) -> list[tuple[str, list[str]]]:
    """What to import, step by step, to charge each group what it costs: first the standard-library modules that
    the interpreter's start or the agent's own code imports directly; then each third-party package the agent's
    code imports, in the order they first complete, by the modules it imports of it (what they pull in that is not
    loaded yet is theirs: a package's own dependencies, the stdlib modules only it uses); then the agent's own
    modules one by one, each after the ones it imports. A step is (group, modules)."""
    def first_party(name: str | None) -> bool:
        return name is None or name.split(".")[0] in FIRST_PARTY

    stdlib = [m for m, parent in tree if group_of(m) == "stdlib" and first_party(parent)]
    third: dict[str, list[str]] = {}
    for m, parent in tree:
        if not first_party(m) and group_of(m) != "stdlib" and first_party(parent):
            third.setdefault(group_of(m), []).append(m)
    own = [(group_of(m), [m]) for m, _ in tree if first_party(m)]
    return [("stdlib (what the agent's code imports)", stdlib), *third.items(), *own]


def _python(code: str, stdin: str = "") -> str:
    out = subprocess.run([sys.executable, "-c", code], input=stdin, capture_output=True, text=True, check=True,
                         timeout=120)
    return out.stdout.splitlines()[-1]


def _importtime() -> str:
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", "import agent.__main__"], capture_output=True,
                         text=True, check=True, timeout=120)
    return out.stderr


def measure_imports(runs: int) -> list[dict[str, object]]:
    """Per group, in the order groups are first imported: the median over ``runs`` fresh interpreters of what
    importing it added (KiB), and how many modules."""
    steps = import_steps(import_tree(_importtime()))
    per_run = [json.loads(_python(_MEASURE, json.dumps(steps))) for _ in range(runs)]
    groups: dict[str, dict[str, object]] = {}
    for i, (name, _rollup, modules) in enumerate(per_run[0]):
        row = groups.setdefault(name, {"group": name, "modules": 0, **dict.fromkeys(ROLLUP_FIELDS, 0.0)})
        row["modules"] = int(str(row["modules"])) + modules - (per_run[0][i - 1][2] if i else 0)
        for f in ROLLUP_FIELDS:
            added = statistics.median(r[i][1][f] - (r[i - 1][1][f] if i else 0) for r in per_run)
            row[f] = float(str(row[f])) + added
    return list(groups.values())


def print_imports(table: list[dict[str, object]], top: int) -> None:
    total = {f: sum(float(str(r[f])) for r in table) for f in ROLLUP_FIELDS}
    print(f"{'group':<28} {'modules':>7} {'PSS KiB':>8} {'RSS KiB':>8} {'anon KiB':>8}")
    ranked = [table[0], *sorted(table[1:], key=lambda r: -float(str(r["Pss"])))]
    for r in ranked[:top]:
        print(f"{r['group']:<28} {r['modules']:>7} {r['Pss']:>8.0f} {r['Rss']:>8.0f} {r['Anonymous']:>8.0f}")
    rest = ranked[top:]
    if rest:
        print(f"{f'({len(rest)} more groups)':<28} {sum(int(str(r['modules'])) for r in rest):>7} "
              + " ".join(f"{sum(float(str(r[f])) for r in rest):>8.0f}" for f in ROLLUP_FIELDS))
    print(f"{'total':<28} {sum(int(str(r['modules'])) for r in table):>7} "
          + " ".join(f"{total[f]:>8.0f}" for f in ROLLUP_FIELDS))


def rollup(pid: int) -> dict[str, int]:
    """PSS, RSS and anonymous memory of ``pid`` (KiB)."""
    lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]
    fields = dict(line.split(":", 1) for line in lines)
    return {k: int(fields[k].split()[0]) for k in ROLLUP_FIELDS}


def measure_lab(pods: int, settle: float) -> dict[str, object]:
    """An idle agent's memory on a 1-node lab with ``pods`` enrolled pods (each its own service account, so its
    own certificate), after every pod is captured, every certificate issued and ``settle`` seconds of idling."""
    from tests.fixtures import lab_helpers as h
    from tests.fixtures import lab_observe as lo

    start = time.monotonic()
    with h.running_lab("memb", nodes=1, pods=pods, namespaces=("mesh",)) as (info, paths):
        up = time.monotonic()
        h.set_namespace_label(paths, "mesh", "ambient")
        lo.wait_agents(paths, ["node-1"], captured={"node-1": {p.ip for p in info.pods}}, timeout=60)
        record = h.agent_record(paths, "node-1")
        assert record is not None, "the agent is not running"
        time.sleep(settle)
        memory = rollup(record.pid)
        threads = len(list(Path(f"/proc/{record.pid}/task").iterdir()))
    return {"pods": pods, **memory, "threads": threads, "lab_up_s": round(up - start, 1),
            "total_s": round(time.monotonic() - start, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.agent_memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    imports = sub.add_parser("imports", help="marginal memory of each group of the agent's imports")
    imports.add_argument("--runs", type=int, default=3)
    imports.add_argument("--top", type=int, default=25, help="groups shown (the rest summed)")
    imports.add_argument("--json", action="store_true")
    lab = sub.add_parser("lab", help="an idle agent's memory in a 1-node lab (root)")
    lab.add_argument("--pods", type=int, default=100)
    lab.add_argument("--settle", type=float, default=10.0)
    args = parser.parse_args(argv)
    if args.command == "imports":
        table = measure_imports(args.runs)
        if args.json:
            print(json.dumps(table, indent=1))
        else:
            print_imports(table, args.top)
    else:
        print(json.dumps(measure_lab(args.pods, args.settle)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
