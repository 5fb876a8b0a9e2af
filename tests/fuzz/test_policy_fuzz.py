"""The policy parser and the object loaders against malformed objects: the defects of issue 17 row 9, each as
a regression test; the corpus of reproducers replayed; and a 20,000-input fuzzing campaign with 0 findings."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fuzz.policy_fuzz import (
    CHECKS,
    LabObjects,
    MeshStore,
    ObjectError,
    PolicyEngine,
    StateError,
    campaign,
    kubernetes_objects,
)

CORPUS = sorted((Path(__file__).parent / "corpus").glob("*.yaml"))


def ap(spec: Any, name: str = "bad", **meta: Any) -> dict[str, Any]:
    return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": "foo", **meta}, "spec": spec}


def nested(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = [value]
    return value


# -- issue 17, row 9 ------------------------------------------------------------------------------------------


def test_deep_nesting_is_rejected_not_raised() -> None:
    """Nesting of 500 and more raised RecursionError (the engine pickles the set to tell whether it changed)."""
    engine = PolicyEngine()
    errors = engine.update([ap({"rules": [{"from": [{"source": {"principals": nested(600)}}]}]})])
    assert [(e.object, e.field) for e in errors] == [("AuthorizationPolicy foo/bad",
                                                      "spec.rules[0].from[0].source.principals[0]")]
    assert "must be a string, not a list" in errors[0].message
    # nested values where nothing reads them: the policy is in force, and stays so when given again
    deep_but_valid = ap({"action": "DENY", "rules": [{}]}, name="deny", annotations={"x": nested(1500)})
    for _ in range(2):
        assert engine.update([deep_but_valid]) == [] and engine.policies == ["AuthorizationPolicy foo/deny"]


def test_a_non_json_key_is_shown_in_the_error() -> None:
    """A YAML date as a mapping key, where a string is expected, raised TypeError while the error text was
    being built (json.dumps refuses non-string keys)."""
    [obj] = yaml.safe_load_all("kind: AuthorizationPolicy\nmetadata: {name: bad, namespace: foo}\n"
                               "spec: {action: {2024-01-01: x}}\n")
    [error] = PolicyEngine().update([obj])
    assert (error.object, error.field) == ("AuthorizationPolicy foo/bad", "spec.action")
    assert error.message.startswith('unknown action {"2024-01-01": "x"}')


def test_a_port_of_4300_digits_is_not_a_port() -> None:
    """Ports of over 4300 digits raised ValueError (int() refuses to convert them)."""
    errors = PolicyEngine().update([ap({"rules": [{"to": [{"operation": {"ports": ["9" * 4301, "0" * 4300 + "80"]}}],
                                                   "when": [{"key": "destination.port", "values": ["9" * 5000]}]}]})])
    assert [(e.field, e.message[:12]) for e in errors] == [
        ("spec.rules[0].to[0].operation.ports[0]", '"99999999999'),
        ("spec.rules[0].when[0].values[0]", '"99999999999')]
    assert all("is not a port" in e.message for e in errors)
    pa = {"kind": "PeerAuthentication", "metadata": {"name": "bad", "namespace": "foo"},
          "spec": {"selector": {"matchLabels": {"app": "web"}}, "portLevelMtls": {10 ** 5000: {"mode": "STRICT"}}}}
    [error] = PolicyEngine().update([pa])
    assert error.field == "spec.portLevelMtls.<an integer of 16610 bits>" and "is not a port" in error.message


@pytest.mark.parametrize("namespace", ["no", "0", "false", "[]", "{}", '""'])
def test_a_falsy_namespace_is_an_error_not_default(namespace: str) -> None:
    """A falsy non-string metadata.namespace (YAML `namespace: no` is false) silently became "default": the
    policy was enforced in the wrong namespace, and the lab stored it there."""
    text = (f"kind: AuthorizationPolicy\nmetadata: {{name: deny-all, namespace: {namespace}}}\n"
            "spec: {action: DENY, rules: [{}]}\n")
    engine = PolicyEngine()
    [error] = engine.update(list(kubernetes_objects(text.encode())))
    assert (error.object, error.field) == ("AuthorizationPolicy ?/deny-all", "metadata.namespace")
    assert engine.policies == []
    with pytest.raises(StateError, match=r"AuthorizationPolicy deny-all: metadata\.namespace must be a non-empty "):
        LabObjects.parse(text)
    pod = (f"kind: Pod\nmetadata: {{name: web, namespace: {namespace}}}\nspec: {{nodeName: n}}\n"
           "status: {podIP: 10.1.0.9}\n")
    [mesh_error] = MeshStore().replace_all(list(kubernetes_objects(pod.encode())))
    assert "Pod web: metadata.namespace must be a non-empty string" in str(mesh_error)


def test_the_lab_state_loader_refuses_deep_nesting() -> None:
    """The lab's state loader let RecursionError escape (PyYAML composes nodes recursively)."""
    deep = b"kind: List\nitems:\n- kind: Namespace\n  metadata: {name: x, labels: " + b"[" * 3000 + b"]" * 3000 + b"}\n"
    with pytest.raises(StateError, match=r"document 1: nested deeper than 100 levels"):
        LabObjects.parse(deep)
    with pytest.raises(ObjectError, match=r"line 4, column"):
        list(kubernetes_objects(deep))


# -- found by the fuzzer -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "problem"), [
    (b"a: !!bool maybe", "cannot read 'maybe'"),  # KeyError escaped
    (b"a: !!timestamp yesterday", "cannot read 'yesterday'"),  # AttributeError escaped
    (b"a: " + b"9" * 5000, "Exceeds the limit (4300 digits)"),  # ValueError without a position
    (b"a: 2024-13-01", "month must be in 1..12"),
    (b"a: &x [1, *x]", "alias *x is inside the node it names"),
])
def test_yaml_that_python_cannot_read_is_an_object_error(text: bytes, problem: str) -> None:
    with pytest.raises(ObjectError) as raised:
        list(kubernetes_objects(text))
    assert str(raised.value).startswith("document 1: ") and problem in str(raised.value)
    assert "line 1, column" in str(raised.value)


def test_mesh_messages_show_any_value() -> None:
    """The mesh's messages used repr(): RecursionError for deep values, ValueError for huge integers; a
    targetPort of 4300 zeros and more raised ValueError."""
    errors = MeshStore().replace_all([
        {"kind": "Pod", "metadata": {"name": nested(2000)}},
        {"kind": "Pod", "metadata": {"name": 10 ** 5000}},
        {"kind": "Service", "metadata": {"name": "s"}, "spec": {"ports": [{"port": 80,
                                                                              "targetPort": "0" * 4400 + "9"}]}},
        {"kind": "Service", "metadata": {"name": "t"}, "spec": {"ports": [{"port": 80, "targetPort": "9" * 4400}]}},
    ])  # the first Service is fine: port 9
    assert [str(e)[:78] for e in errors] == [
        "Pod: metadata.name must be a non-empty string, not [[[[...]]]]",
        "Pod: metadata.name must be a non-empty string, not <an integer of 16610 bits>",
        "Service default/t: spec.ports[0].targetPort must be a port number 1-65535, not",
    ]


# -- the corpus and the campaign ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_corpus(path: Path) -> None:
    """Each reproducer through every reader: only the readers' own errors, naming what and where."""
    data = path.read_bytes()
    CHECKS["yaml"](data)
    CHECKS["lab"](data)
    try:  # the in-memory readers get what PyYAML makes of it, unbounded, when it can
        objects = [o for o in yaml.safe_load_all(data) if o is not None]
    except (yaml.YAMLError, ValueError, RecursionError, KeyError, AttributeError):  # what PyYAML itself raises
        return
    CHECKS["policy"](objects)
    CHECKS["mesh"](objects)


def test_corpus_is_there() -> None:
    assert len(CORPUS) >= 7


def test_campaign(caplog: pytest.LogCaptureFixture) -> None:
    """20,000 malformed objects: no exception but the readers' validation errors, every error naming the
    object and field; every reader both accepts and rejects some (the checks run)."""
    caplog.set_level(logging.CRITICAL)
    report = campaign(20_000, seed=0)  # deterministic here; python -m tests.fuzz.policy_fuzz --seed N explores
    assert report.findings == {}
    for target in ("policy", "mesh", "yaml", "lab"):
        assert report.outcomes[f"{target} rejected"] > 100, report.outcomes
        assert report.outcomes[f"{target} accepted"] > 100, report.outcomes
