"""bench.agent_path runs the agents' real per-connection steps on its mesh: the client's connection is tunnelled
(to the pod, or to the Service's endpoint) and allowed by the server's policies, and both sides are reported."""

from __future__ import annotations

import pytest

from bench import agent_path


@pytest.mark.parametrize("service", [False, True])
def test_both_sides_run_and_are_reported(service: bool, capsys: pytest.CaptureFixture[str]) -> None:
    agent_path.main(["--runs", "1", "--count", "20", *(["--service"] if service else [])])
    out = capsys.readouterr().out
    assert ("Service 10.96.0.20:80" in out) == service
    assert "client agent:" in out and "server agent:" in out
