"""Issue 4 end to end, on a real `ambit lab`: Istio's AuthorizationPolicy and PeerAuthentication, applied with
`ambit lab apply -f`, enforced by the destination's agent on real connections between pods.

Layout: 2 nodes, 4 pods each; pod k of node i is ``app-i-k`` with its own service account (so its own SPIFFE
identity); k = 1 and 4 are in ``shop`` (enrolled before each test), k = 2 in ``ext`` and k = 3 in ``late`` (not
enrolled before each test). Every pod runs an echo server on 8080 for the whole module, ``shop/app-2-1`` also
one on 9090; no pod is ever restarted. Before each test every policy is deleted and the agents are seen (in
their /config_dump) to have none in force and to capture exactly the enrolled pods.

A refused connection is what a mesh deny looks like to the client: the proxy accepted the connection, then
reset it (ConnectionResetError) or closed it without a byte of answer; and the server never saw it.
"""

from __future__ import annotations

import contextlib
import io
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.lab import cli as lab_cli
from agent.lab import state as lab_state
from tests.fixtures import lab_helpers as h
from tests.fixtures import lab_observe as o
from tests.fixtures.eventually import eventually_sync
from tests.fixtures.lab_helpers import EchoServer, Payload

pytestmark = o.lab_marks()

SHOP, EXT, LATE = "shop", "ext", "late"
PORT, ALT_PORT = h.SERVER_PORT, 9090
POLICY_KINDS = ("AuthorizationPolicy", "PeerAuthentication")
ENFORCED_WITHIN = 1.0  # seconds from `ambit lab apply` of a DENY to the first refused connection (issue 4)
SETTLE = 10.0  # bound on waiting for the agents to show a state change in their config dump


@dataclass
class PolicyLab(o.RunningLab):
    tmp: Path
    servers: dict[tuple[str, int], EchoServer] = field(default_factory=dict)


    def server(self, name: str, port: int = PORT) -> EchoServer:
        return self.servers[(name, port)]

    def captured(self, enrolled: set[str]) -> dict[str, set[str]]:
        """What each agent must capture when exactly the namespaces ``enrolled`` are in the mesh."""
        out: dict[str, set[str]] = {n: set() for n in self.nodes}
        for p in self.info.pods:
            if p.namespace in enrolled:
                out[p.node].add(p.ip)
        return out

    def settle(self, policies: list[str], enrolled: set[str]) -> float:
        return o.wait_agents(self.paths, self.nodes, policies=policies, captured=self.captured(enrolled),
                             timeout=SETTLE)

    def apply(self, text: str) -> str:
        res = o.lab_apply(self.name, self.tmp, text)
        assert res.returncode == 0, f"ambit lab apply failed ({res.returncode}): {res.stdout}{res.stderr}"
        return res.stdout

    def reset(self) -> None:
        """No policy; shop enrolled, ext and late not."""
        with lab_state.edit(self.paths.state) as st:
            for obj in st.objects:
                if obj["kind"] in POLICY_KINDS:
                    st.remove(obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"])
        h.set_namespace_label(self.paths, SHOP, "ambient")
        h.set_namespace_label(self.paths, EXT, None)
        h.set_namespace_label(self.paths, LATE, None)
        self.settle([], {SHOP})


@pytest.fixture(scope="module")
def policy_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PolicyLab]:
    with h.running_lab("pol", nodes=2, pods=4, namespaces=(SHOP, EXT, LATE)) as (info, paths):
        lab = PolicyLab(info, paths, tmp_path_factory.mktemp("policies"))
        try:
            for p in info.pods:
                lab.servers[(p.name, PORT)] = EchoServer(p, PORT).start()
            lab.servers[("app-2-1", ALT_PORT)] = EchoServer(lab.pod("app-2-1"), ALT_PORT).start()
            yield lab
        finally:
            for server in lab.servers.values():
                server.close()


@pytest.fixture
def lab(policy_lab: PolicyLab) -> PolicyLab:
    policy_lab.reset()
    return policy_lab


# -- checks -----------------------------------------------------------------------------------------------------------
def assert_refused(lab: PolicyLab, src: str, dst: str, port: int = PORT) -> o.Attempt:
    """The connection is reset (or closed without an answer) and the server never sees it."""
    server = lab.server(dst, port)
    before = len(server.peers)
    a = o.attempt(lab.pod(src), lab.pod(dst), port)
    assert a.refused, f"{src} -> {dst}:{port} should be refused by the mesh, got {a}"
    time.sleep(0.05)  # a connection that did get through would have been accepted by now
    reached = [peer for peer in server.peers[before:] if peer[0] == lab.pod(src).ip]
    assert not reached, f"{src} -> {dst}:{port} was refused, yet the server accepted {reached}"
    return a


def assert_served(lab: PolicyLab, src: str, dst: str, port: int = PORT) -> h.Echo:
    """The payload goes up and comes back byte-exact, and the server saw the client's own address."""
    echo = h.transfer(lab.pod(src), lab.pod(dst), Payload.make(64 << 10), port=port)
    assert echo.peer[0] == lab.pod(src).ip, f"{dst} saw {echo.peer}, not {src}'s address"
    return echo


def explain(lab: PolicyLab, *pairs: tuple[str, str, int]) -> list[str]:
    """`ambit policy explain SRC DST:PORT --lab LAB` for each (src pod, dst pod, port), run concurrently."""
    cmds = [["policy", "explain", f"{lab.pod(s).namespace}/{s}", f"{lab.pod(d).namespace}/{d}:{port}",
             "--lab", lab.name] for s, d, port in pairs]
    results = o.ambit_many(cmds)
    for cmd, res in zip(cmds, results, strict=True):
        assert res.returncode == 0, f"ambit {' '.join(cmd)}: {res.stdout}{res.stderr}"
    return [r.stdout for r in results]


def decision(explained: str) -> str:
    lines = [line for line in explained.splitlines() if line.startswith("decision: ")]
    assert len(lines) == 1, f"no single decision line in:\n{explained}"
    return lines[0]


def deny_yaml(name: str, namespace: str, app: str, principals: list[str]) -> str:
    listed = ", ".join(f'"{p}"' for p in principals)
    return f"""\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: {name}
  namespace: {namespace}
spec:
  selector:
    matchLabels:
      app: {app}
  action: DENY
  rules:
  - from:
    - source:
        principals: [{listed}]
"""


def peer_auth_yaml(name: str, namespace: str, mode: str) -> str:
    return f"""\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: {name}
  namespace: {namespace}
spec:
  mtls:
    mode: {mode}
"""


# -- AuthorizationPolicy ----------------------------------------------------------------------------------------------
def test_deny_policy_resets_denied_clients_and_serves_the_others(lab: PolicyLab) -> None:
    denied = [lab.pod("app-1-4"), lab.pod("app-2-4")]  # over HBONE from node-1, and on node-2 itself
    out = lab.apply(deny_yaml("deny-app-x-4", SHOP, "app-2-1", [o.principal(p) for p in denied]))
    assert "authorizationpolicy.security.istio.io/deny-app-x-4 created" in out
    lab.settle(["AuthorizationPolicy shop/deny-app-x-4"], {SHOP})

    for src in ("app-1-4", "app-2-4"):
        assert_refused(lab, src, "app-2-1")
    for src in ("app-1-1", "app-1-2"):  # a mesh peer with another identity; a plaintext client of ext
        assert_served(lab, src, "app-2-1")
    assert_served(lab, "app-1-4", "app-2-4")  # the policy selects app-2-1 only

    denied_why, allowed_why = explain(lab, ("app-1-4", "app-2-1", PORT), ("app-1-1", "app-2-1", PORT))
    assert decision(denied_why) == "decision: DENY: denied by AuthorizationPolicy shop/deny-app-x-4 rule 0", denied_why
    assert "arrives over HBONE as cluster.local/ns/shop/sa/app-1-4" in denied_why
    assert decision(allowed_why).startswith("decision: ALLOW"), allowed_why


def test_allow_policy_admits_only_the_listed_principal_on_the_listed_port(lab: PolicyLab) -> None:
    lab.apply(f"""\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-app-1-1
  namespace: shop
spec:
  selector:
    matchLabels:
      app: app-2-1
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["{o.principal(lab.pod("app-1-1"))}"]
    to:
    - operation:
        ports: ["{PORT}"]
""")
    lab.settle(["AuthorizationPolicy shop/allow-app-1-1"], {SHOP})

    assert_served(lab, "app-1-1", "app-2-1", PORT)
    assert_refused(lab, "app-1-1", "app-2-1", ALT_PORT)  # the listed principal, another port
    assert_refused(lab, "app-1-4", "app-2-1", PORT)  # another principal
    assert_refused(lab, "app-2-4", "app-2-1", PORT)  # another principal, same node
    assert_refused(lab, "app-1-2", "app-2-1", PORT)  # no principal at all (plaintext from ext)
    assert_served(lab, "app-1-4", "app-2-4", PORT)  # other workloads: no ALLOW policy applies to them

    listed, other_port, other_principal = explain(
        lab, ("app-1-1", "app-2-1", PORT), ("app-1-1", "app-2-1", ALT_PORT), ("app-1-4", "app-2-1", PORT))
    assert decision(listed) == "decision: ALLOW: allowed by AuthorizationPolicy shop/allow-app-1-1 rule 0", listed
    for text in (other_port, other_principal):
        assert decision(text).startswith("decision: DENY: no ALLOW policy matched"), text
        assert "allow-app-1-1" in decision(text), text


# -- PeerAuthentication -----------------------------------------------------------------------------------------------
def test_strict_blocks_plaintext_from_outside_the_mesh_and_allows_mesh_clients(lab: PolicyLab) -> None:
    lab.apply(peer_auth_yaml("mtls", SHOP, "STRICT"))
    lab.settle(["PeerAuthentication shop/mtls"], {SHOP})
    logs = h.AgentLogs(lab.paths, lab.nodes)

    refused = assert_refused(lab, "app-1-2", "app-2-1")  # ext (not enrolled), from node-1: the plaintext path
    assert_served(lab, "app-1-1", "app-2-1")  # enrolled: HBONE, mutual TLS
    assert_served(lab, "app-2-4", "app-2-1")  # enrolled, same node

    src, dst = lab.pod("app-1-2"), lab.pod("app-2-1")
    client = f"('{src.ip}', {refused.local[1]})" if refused.local else f"('{src.ip}', "  # (reset during connect)
    logs.wait({"node-2": [f"plaintext {client}", f" -> ('{dst.ip}', {PORT}) denied: "
                          "denied by PeerAuthentication shop/mtls: mTLS is STRICT"]}, timeout=5)

    (why,) = explain(lab, ("app-1-2", "app-2-1", PORT))
    assert "not in the mesh, arrives as plaintext" in why, why
    assert decision(why).startswith("decision: DENY: denied by PeerAuthentication shop/mtls: mTLS is STRICT"), why


def test_strict_blocks_plaintext_from_a_pod_outside_the_mesh_on_the_same_node(lab: PolicyLab) -> None:
    lab.apply(peer_auth_yaml("mtls", SHOP, "STRICT"))
    lab.settle(["PeerAuthentication shop/mtls"], {SHOP})
    assert_served(lab, "app-2-4", "app-2-1")  # enrolled, same node
    assert_refused(lab, "app-2-2", "app-2-1")  # ext (not enrolled), on the destination's own node


def test_permissive_allows_both_and_switching_modes_takes_effect(lab: PolicyLab) -> None:
    lab.apply(peer_auth_yaml("mtls", SHOP, "PERMISSIVE"))
    lab.settle(["PeerAuthentication shop/mtls"], {SHOP})
    for src in ("app-1-2", "app-2-2", "app-1-1", "app-2-4"):
        assert_served(lab, src, "app-2-1")

    lab.apply(peer_auth_yaml("mtls", SHOP, "STRICT"))  # the same object, replaced
    o.refused_until(lab.pod("app-1-2"), lab.pod("app-2-1"), PORT, timeout=5)
    assert_served(lab, "app-1-1", "app-2-1")

    lab.apply(peer_auth_yaml("mtls", SHOP, "PERMISSIVE"))
    eventually_sync(lambda: o.attempt(lab.pod("app-1-2"), lab.pod("app-2-1")).outcome == "ok",
                    "plaintext from ext served again under PERMISSIVE", 5, interval=0.05)
    assert_served(lab, "app-1-2", "app-2-1")


# -- enrollment -------------------------------------------------------------------------------------------------------
def test_relabelling_a_namespace_enrolls_and_releases_it_without_restarting_pods(lab: PolicyLab) -> None:
    """``late`` in and out of the mesh: as a client it meets shop's STRICT mode (refused in plaintext, served
    with mTLS), as a destination its own deny-all policy (enforced only while an agent captures it)."""
    lab.apply(peer_auth_yaml("mtls", SHOP, "STRICT") + "---\n" + """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-all
  namespace: late
spec: {}
""")
    in_force = ["AuthorizationPolicy late/deny-all", "PeerAuthentication shop/mtls"]
    lab.settle(in_force, {SHOP})
    late_pods = [lab.pod("app-1-3"), lab.pod("app-2-3")]
    inodes = {p.name: o.netns_inode(p) for p in late_pods}
    served_before = lab.server("app-2-3").accepted

    def outside() -> None:
        assert_refused(lab, "app-1-3", "app-2-1")  # plaintext into STRICT shop
        assert_served(lab, "app-1-1", "app-2-3")  # no agent decides for a pod outside the mesh

    outside()

    started = time.monotonic()
    assert "namespace/late labeled" in o.ambit_ok("lab", "--name", lab.name, "label", "namespace", LATE,
                                                  "istio.io/dataplane-mode=ambient")
    lab.settle(in_force, {SHOP, LATE})
    enrolled_after = time.monotonic() - started
    assert_served(lab, "app-1-3", "app-2-1")  # now with late/app-1-3's identity, over mTLS
    assert_served(lab, "app-2-3", "app-1-1")  # and from the other node's late pod
    assert_refused(lab, "app-1-1", "app-2-3")  # late's deny-all is enforced now
    assert_refused(lab, "app-2-4", "app-2-3")

    started = time.monotonic()
    assert "namespace/late unlabeled" in o.ambit_ok("lab", "--name", lab.name, "label", "namespace", LATE,
                                                    "istio.io/dataplane-mode-")
    lab.settle(in_force, {SHOP})
    released_after = time.monotonic() - started
    outside()

    # The same pods throughout: the same network namespaces, the same servers still accepting.
    assert {p.name: o.netns_inode(p) for p in late_pods} == inodes
    assert lab.server("app-2-3").accepted > served_before
    print(f"\nlabel -> agents capture: enrolled in {enrolled_after:.2f}s, released in {released_after:.2f}s "
          "(each includes ~1 s of `ambit` start-up)")


# -- invalid policies -------------------------------------------------------------------------------------------------
INVALID = [
    ("bad-cidr", """\
  action: DENY
  rules:
  - from:
    - source:
        ipBlocks: ["10.0.0.300/8"]
""", "spec.rules[0].from[0].source.ipBlocks[0]", "is not a CIDR"),
    ("bad-port", """\
  action: ALLOW
  rules:
  - to:
    - operation:
        ports: ["80800"]
""", "spec.rules[0].to[0].operation.ports[0]", "is not a port"),
    ("bad-field", """\
  action: ALLOW
  rulez: [{}]
""", "spec.rulez", "unknown field"),
    ("bad-action", """\
  action: AUDIT
  rules: [{}]
""", "spec.action", "AUDIT"),
]


def policy_yaml(name: str, spec: str) -> str:
    return f"""\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: {name}
  namespace: shop
spec:
{spec}"""


def policies_in_state(lab: PolicyLab) -> set[str]:
    st = lab_state.LabObjects.load(lab.paths.state)
    return {f"{obj['kind']} {obj['metadata']['namespace']}/{obj['metadata']['name']}"
            for kind in POLICY_KINDS for obj in st.of_kind(kind)}


def test_invalid_policy_is_refused_naming_object_and_field_and_the_rest_keeps_working(lab: PolicyLab) -> None:
    good = "AuthorizationPolicy shop/deny-app-1-4"
    lab.apply(deny_yaml("deny-app-1-4", SHOP, "app-2-1", [o.principal(lab.pod("app-1-4"))]))
    lab.settle([good], {SHOP})
    assert_refused(lab, "app-1-4", "app-2-1")

    files = [o.yaml_file(lab.tmp, policy_yaml(name, spec)) for name, spec, _, _ in INVALID]
    results = o.ambit_many([["lab", "--name", lab.name, "apply", "-f", str(f)] for f in files])
    for (name, _, field_path, problem), res in zip(INVALID, results, strict=True):
        assert res.returncode != 0, f"{name} was accepted: {res.stdout}"
        assert f"AuthorizationPolicy shop/{name}: {field_path}: " in res.stderr, res.stderr
        assert problem in res.stderr, res.stderr
    # A batch with one valid and one invalid object is refused whole, as Istio's webhook refuses it: the valid
    # one (it would deny app-1-1) is not applied either.
    batch = deny_yaml("deny-app-1-1", SHOP, "app-2-1", [o.principal(lab.pod("app-1-1"))]) + "---\n" + \
        policy_yaml(*INVALID[0][:2])
    res = o.lab_apply(lab.name, lab.tmp, batch)
    assert res.returncode != 0 and "AuthorizationPolicy shop/bad-cidr" in res.stderr, res.stderr
    assert "deny-app-1-1" not in res.stdout
    assert policies_in_state(lab) == {good}

    # An invalid object that reaches the state anyway (a cluster without the admission webhook): the agents
    # reject it, say so, and keep enforcing the others.
    logs = h.AgentLogs(lab.paths, lab.nodes)
    with lab_state.edit(lab.paths.state) as st:
        st.put(lab_state.LabObjects.parse(policy_yaml(*INVALID[0][:2])).objects[0])
    logs.wait({n: ["policy rejected: AuthorizationPolicy shop/bad-cidr: spec.rules[0].from[0].source.ipBlocks[0]"]
               for n in lab.nodes}, timeout=5)
    lab.settle([good], {SHOP})
    assert_refused(lab, "app-1-4", "app-2-1")
    assert_served(lab, "app-1-1", "app-2-1")


# -- how fast ---------------------------------------------------------------------------------------------------------
def test_deny_is_enforced_within_a_second_of_apply(lab: PolicyLab, capsys: pytest.CaptureFixture[str]) -> None:
    """From the start of `ambit lab apply -f deny.yaml` (its code, run in this process: the figure is not about
    interpreter start-up) to the first connection of the denied client that is refused. Connections are made
    back to back until then; three rounds, each from a state without the policy."""
    src, dst = lab.pod("app-1-4"), lab.pod("app-2-1")
    path = o.yaml_file(lab.tmp, deny_yaml("deny-now", SHOP, "app-2-1", [o.principal(src)]))
    figures = []
    for _ in range(3):
        lab.settle([], {SHOP})
        assert o.attempt(src, dst).outcome == "ok"
        started = time.monotonic()
        with contextlib.redirect_stdout(io.StringIO()) as out:
            code = lab_cli.main(["--name", lab.name, "apply", "-f", str(path)])
        applied = time.monotonic() - started
        assert code == 0 and "deny-now created" in out.getvalue(), out.getvalue()
        waited, refusal = o.refused_until(src, dst, PORT, timeout=5)
        figures.append(applied + waited)
        assert refusal.refused
        with lab_state.edit(lab.paths.state) as st:
            st.remove("AuthorizationPolicy", SHOP, "deny-now")
    with capsys.disabled():
        print(f"\napply -> enforcement of a DENY: {', '.join(f'{f * 1000:.0f} ms' for f in figures)} "
              f"(median {statistics.median(figures) * 1000:.0f} ms)")
    assert max(figures) < ENFORCED_WITHIN, f"DENY enforced only after {max(figures):.3f}s: {figures}"
