"""``python -m bench``'s options for the connection workload and the ambit-svc path: defaults, bad values
refused with a message, and ambit-svc skipped with a note in the loopback set, which has no Services."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

from bench.__main__ import _loopback_paths, _parser, main
from bench.paths import MeshCerts


@pytest.fixture
def handlers() -> Iterator[None]:
    """main() installs SIGTERM and SIGHUP handlers: put pytest's back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def test_defaults_and_bounds(capsys: pytest.CaptureFixture[str]) -> None:
    args = _parser().parse_args([])
    assert (args.conn_count, args.conn_concurrency, args.conn_runs, args.conn_size) == (2000, 50, 3, 100)
    assert args.paths == "direct,ambit,ambit-svc,hbone,envoy"
    assert _parser().parse_args(["--conn-runs", "0"]).conn_runs == 0
    for bad in (["--conn-concurrency", "1"], ["--conn-count", "0"], ["--conn-runs", "-1"]):
        with pytest.raises(SystemExit):
            _parser().parse_args(bad)
    err = capsys.readouterr().err
    assert "--conn-concurrency: must be at least 2" in err and "--conn-runs: must be at least 0" in err


def test_loopback_skips_the_service_path_with_a_note(capsys: pytest.CaptureFixture[str]) -> None:
    paths = _loopback_paths(["envoy", "ambit-svc", "hbone", "direct"], MeshCerts.create(), None, say_skipped=True)
    assert [p.name for p in paths] == ["envoy", "direct"]
    err = capsys.readouterr().err
    assert ("loopback set: path ambit-svc skipped (it goes through a Service VIP, and only the lab's agents "
            "resolve Services)") in err
    assert "loopback set: path hbone skipped (on loopback the ambit path is the tunnel library alone already)" in err
    assert [p.name for p in _loopback_paths(["ambit-svc"], MeshCerts.create(), None, say_skipped=False)] == []
    assert capsys.readouterr().err == ""


@pytest.mark.usefixtures("handlers")
def test_a_loopback_run_of_only_the_service_path_does_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--sets", "loopback", "--paths", "ambit-svc", "--quiet-wait", "0"]) == 2
    err = capsys.readouterr().err
    assert "path ambit-svc skipped" in err and "loopback set skipped: none of its paths was asked for" in err


@pytest.mark.usefixtures("handlers")
def test_an_unknown_path_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--sets", "loopback", "--paths", "direct,ambit-vip"])
    err = capsys.readouterr().err
    assert "unknown path(s) ['ambit-vip']; choose from direct, ambit, ambit-svc, hbone, envoy" in err
