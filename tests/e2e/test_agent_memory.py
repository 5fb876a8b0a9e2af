"""The agent compiles its eBPF programs in a short-lived loader process: the long-lived agent maps no LLVM,
clang or libbcc, and its memory is reported (issue 11)."""

from __future__ import annotations

from pathlib import Path

from tests.fixtures import lab_helpers as h
from tests.fixtures import lab_observe as lo

pytestmark = lo.lab_marks()


def test_the_agent_maps_no_compiler_and_reports_its_memory() -> None:
    with h.running_lab("mem", nodes=1, pods=2, namespaces=("mesh",)) as (info, paths):
        h.set_namespace_label(paths, "mesh", "ambient")
        lo.wait_agents(paths, ["node-1"], captured={"node-1": {p.ip for p in info.pods}})
        record = h.agent_record(paths, "node-1")
        assert record is not None
        maps = Path(f"/proc/{record.pid}/maps").read_text().splitlines()
        libraries = {line.split()[-1] for line in maps if "/" in line}
        compilers = sorted(lib for lib in libraries if any(n in lib for n in ("libLLVM", "libclang", "libbcc")))
        assert compilers == [], f"the agent maps {compilers}"
        rollup_lines = Path(f"/proc/{record.pid}/smaps_rollup").read_text().splitlines()[1:]
        rollup = dict(line.split(":", 1) for line in rollup_lines)
        pss_mb = int(rollup["Pss"].split()[0]) / 1024
        print(f"\nagent PSS with 2 enrolled pods: {pss_mb:.0f} MB")
        assert pss_mb < 400  # a generous bound: the figure is for BENCHMARKS.md, not a timing assert
