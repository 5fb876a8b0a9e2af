"""bench.store at a tiny scale, so that it cannot rot: the cluster it makes, the events, the report (no timing
asserts: this machine's speed is not under test)."""

from __future__ import annotations

import pytest

from bench.store import KINDS, Cluster, Scale, loaded_store, main, time_events


def test_the_synthetic_cluster_has_the_shape_asked_for() -> None:
    scale = Scale(namespaces=3, nodes=4, pods=60, services=12, per_service=5)
    assert scale.check() is None and (scale.buckets, scale.groups) == (4, 1)
    cluster = Cluster(scale, seed=3)
    state = loaded_store(list(cluster.objects.values())).state
    assert (len(state.by_uid), len(state.services), len(state.nodes), len(state.namespaces)) == (60, 12, 4, 3)
    assert all(len(eps) == 5 for eps in state.endpoints.values())  # every Service selects exactly per_service
    assert {tuple(sorted(e.ports.items())) for eps in state.endpoints.values() for e in eps.values()} == {
        ((80, 8080), (9090, 9090))}  # the named target port resolved per pod
    assert sum(w.enrolled for w in state.by_uid.values()) == 20  # one namespace in two is enrolled


def test_every_kind_of_event_changes_the_store() -> None:
    scale = Scale(namespaces=2, nodes=2, pods=40, services=8, per_service=5)
    cluster = Cluster(scale, seed=1)
    store = loaded_store(list(cluster.objects.values()))
    times = time_events(cluster, store, rounds=5)  # raises SystemExit if an event changed nothing
    assert {kind: (len(t.wall), len(t.cpu)) for kind, t in times.items()} == dict.fromkeys(KINDS, (5, 5))
    assert len(store.state.by_uid) == 40 and len(store.state.services) == 8  # added and deleted in turn


@pytest.mark.parametrize(("args", "message"), [
    (["--pods", "41"], "multiples of --namespaces"),
    (["--per-service", "3"], "multiple of --per-service"),
    (["--services", "4"], "services per namespace must be"),
])
def test_scales_that_cannot_be_laid_out_are_refused(args: list[str], message: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--namespaces", "2", "--pods", "40", "--services", "8", "--per-service", "5", *args])
    assert message in capsys.readouterr().err


def test_a_tiny_run_reports_every_figure(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--namespaces", "2", "--nodes", "2", "--pods", "40", "--services", "8", "--per-service", "5",
          "--rounds", "10", "--rebuilds", "1", "--seconds", "0.2", "--quiet-wait", "0"])
    out = capsys.readouterr().out
    assert "40 workloads (pods) in 2 namespaces on 2 nodes, 8 Services, 40 endpoints" in out
    for row in (*KINDS, "whole rebuild (build_state)", "traffic alone", "deltas, one event per apply",
                "deltas, batched every 50 ms", "deltas, batched every 50 ms, 4 per apply",
                "whole rebuilds, batched every 50 ms"):
        assert f"   {row} " in out, row
    assert out.count("target: ") == 5 and "garbage collector: a full collection" in out
