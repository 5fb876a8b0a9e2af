"""The socket campaign in CI: a few hundred hostile sessions against a real ``ambit hbone serve`` on loopback
while a legitimate client works; nothing may be found (no server error or traceback, no failed legitimate
round trip, no fd or memory growth, no refused client answered)."""

from __future__ import annotations

from tests.fuzz import socket_campaign


def test_hostile_sessions_leave_the_server_serving() -> None:
    report = socket_campaign.run(sessions=300, concurrency=16, seed=7, quiet=50, progress=lambda _line: None)
    print("\n".join(report.lines()))
    assert report.findings == []
    assert report.sessions == 300
    assert report.variants.get("hbone", 0) > 100 and report.variants.get("refused", 0) > 10
    assert len(report.legit_quiet) == 50 and report.legit_attack
