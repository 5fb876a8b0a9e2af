"""kubernetes_objects: what a YAML stream holds, or ObjectError naming the document and position, whatever
the text; the same with libyaml's event parser and with PyYAML's own."""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from agent.mesh.convert import ObjectError
from agent.sources import objectfile
from agent.sources.objectfile import MAX_ALIASED, MAX_DEPTH, kubernetes_objects


@pytest.fixture(params=objectfile.EVENT_SOURCES, ids=lambda e: e.__name__, autouse=True)
def events(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.setattr(objectfile, "_Loader", objectfile.loader(request.param))
    yield request.param


def refused(data: bytes) -> str:
    with pytest.raises(ObjectError) as raised:
        list(kubernetes_objects(data))
    return str(raised.value)


def test_documents_and_lists() -> None:
    data = b"""\
kind: Pod
metadata: {name: a, creationTimestamp: 2024-01-01T00:00:00Z}
---
---
apiVersion: v1
kind: List
items:
- {kind: Namespace, metadata: {name: x}}
- {kind: Pod, metadata: {name: b}}
---
kind: PodList
items: [{kind: Pod, metadata: {name: c}}]
---
kind: List
"""
    objects = list(kubernetes_objects(data))
    assert [o["metadata"]["name"] for o in objects] == ["a", "x", "b", "c"]
    assert objects[0]["metadata"]["creationTimestamp"] == datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
    docs = list(yaml.safe_load_all(data))  # the same values as PyYAML's safe loader makes
    assert objects == [docs[0], *docs[2]["items"], *docs[3]["items"]]


@pytest.mark.parametrize(("data", "message"), [
    (b"kind: Pod\n---\n- 1\n", "document 2: must be a Kubernetes object (a mapping), not list"),
    (b"kind: List\nitems: 3\n", "document 1 (List): items must be a list, not int"),
    (b"kind: List\nitems: ''\n", "document 1 (List): items must be a list, not str"),
    (b"kind: List\nitems: [{kind: Pod}, x]\n", "document 1 (List): items[1] must be a Kubernetes object"),
    (b"kind: [a]\nitems: 3\n", None),  # not a List: an object whose kind is odd, for its reader to refuse
])
def test_objects_must_be_mappings(data: bytes, message: str | None) -> None:
    if message is None:
        assert list(kubernetes_objects(data)) == [{"kind": ["a"], "items": 3}]
    else:
        assert refused(data).startswith(message)


def test_nesting_is_bounded() -> None:
    assert list(kubernetes_objects(b"a: " + b"[" * (MAX_DEPTH - 1) + b"]" * (MAX_DEPTH - 1)))
    message = refused(b"kind: Pod\nspec: " + b"[" * 5000 + b"]" * 5000)
    assert message.startswith(f"document 1: nested deeper than {MAX_DEPTH} levels") and "line 2, column" in message


def test_aliases_are_bounded() -> None:
    assert list(kubernetes_objects(b"a: &a {x: [1, 2]}\nb: *a\nc: {<<: *a, y: 1}\n")) == [
        {"a": {"x": [1, 2]}, "b": {"x": [1, 2]}, "c": {"x": [1, 2], "y": 1}}]
    assert "alias *x is inside the node it names" in refused(b"a: &x {b: [*x]}\n")
    laughs = b"a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + b"".join(
        b"a%d: &a%d [" % (i, i) + b", ".join([b"*a%d" % (i - 1)] * 10) + b"]\n" for i in range(1, 7))
    assert f"aliases stand for more than {MAX_ALIASED} nodes" in refused(laughs)


@pytest.mark.parametrize(("data", "problem"), [
    (b"a: " + b"9" * 4301, "cannot read '9999"),
    (b"a: -" + b"1" * 5000, "Exceeds the limit (4300 digits)"),
    (b"a: 2024-02-30", "day is out of range for month"),
    (b"a: !!bool maybe", "cannot read 'maybe'"),
    (b"a: !!timestamp soon", "cannot read 'soon'"),
    (b"a: !!float x", "cannot read 'x'"),
    (b"a: !!binary 'zzz'", "failed to decode base64"),
    (b"a: !!python/name:os.system x", "could not determine a constructor"),
    (b"? [a]\n: 1\n", "found unhashable key"),
    (b"a: \xff", "document 1: "),
    (b"a: [1, 2", "document 1: "),
])
def test_what_python_cannot_read_is_refused_where_it_is(data: bytes, problem: str) -> None:
    message = refused(data)
    assert message.startswith("document 1: ") and problem in message
    assert "sys.set_int_max_str_digits" not in message


def test_odd_scalars_are_read_as_yaml_1_1_reads_them() -> None:
    [obj] = kubernetes_objects(b"a: no\nb: 0x1F\nc: 190:20:30\nd: .nan\ne: ~\nf: 2024-01-01\ng: '9'\n"
                               b"h: {1: x, 2024-01-02: y}\n")
    assert obj["a"] is False and obj["b"] == 31 and obj["c"] == 685230 and obj["d"] != obj["d"]
    assert obj["e"] is None and obj["f"] == datetime.date(2024, 1, 1) and obj["g"] == "9"
    assert obj["h"] == {1: "x", datetime.date(2024, 1, 2): "y"}
