"""The agent, the CA and ``ambit status`` speak HTTP through agent/http (h11): none imports aiohttp or the libraries
it brings (9.4 MiB PSS in the agent, issue 11), which is a test-only dependency now. Each entry point is imported in
a fresh interpreter, as it starts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.fixtures.repo import REPO

AIOHTTP_FAMILY = ("aiohttp", "multidict", "yarl", "frozenlist", "aiosignal", "propcache", "aiohappyeyeballs")


@pytest.mark.parametrize("entry", ["agent.__main__", "agent.ca.__main__", "agent.cli.status"])
def test_entry_point_imports_no_aiohttp(entry: str) -> None:
    probe = f"import json, sys\nimport {entry}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60,
                         check=True).stdout
    modules = json.loads(out)
    assert "h11" in modules and "agent.http.client" in modules  # the probe sees what the entry point imports
    assert [m for m in modules if m.split(".")[0] in AIOHTTP_FAMILY] == []
