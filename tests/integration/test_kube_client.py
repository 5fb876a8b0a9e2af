"""Ambit's Kubernetes client against the API-server fake over real HTTP and TLS: client certificates, tokens,
the in-cluster token's rotation, exec credential plugins (a real script, run as kubectl runs it), merged
``$KUBECONFIG`` files and contexts (and a command line's ``--context``), ``insecure-skip-tls-verify`` and
``tls-server-name``."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.cli.status import policy_main
from agent.http import CertificateError, ConnectError, Timeouts
from agent.kube import PODS, Informer, KubeClient, KubeConfigError, connect
from agent.kube.credentials import ExecPlugin
from agent.kube.kubeconfig import in_cluster, kubeconfig_files, load_kubeconfig
from agent.retry import Backoff
from tests.fixtures.eventually import eventually
from tests.fixtures.kube_fake import FakeApiServer, namespace, pod

TIMEOUTS = Timeouts(total=5)
FAST = Backoff(initial=0.02, cap=0.1)
EXEC_V1 = "client.authentication.k8s.io/v1"
EXEC_V1BETA1 = "client.authentication.k8s.io/v1beta1"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def write_kubeconfig(path: Path, server: FakeApiServer | str, user: dict[str, Any], **cluster: Any) -> Path:
    """One cluster, user and context named ``fake``; the fake's CA unless ``cluster`` says otherwise."""
    body: dict[str, Any] = {"server": server if isinstance(server, str) else server.url}
    if isinstance(server, FakeApiServer) and server.ca_pem is not None and "insecure-skip-tls-verify" not in cluster:
        body["certificate-authority-data"] = b64(server.ca_pem)
    body.update(cluster)
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": body}], "users": [{"name": "fake", "user": user}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}]}))
    return path


async def status_of(client: KubeClient) -> int:
    return (await client.call("GET", "/api/v1/pods", timeouts=TIMEOUTS)).status


def credentials_seen(server: FakeApiServer) -> list[str]:
    return [r.credential for r in server.requests]


# -- client certificates, tokens, TLS ---------------------------------------------------------------------


async def test_client_certificate_from_files_over_mutual_tls(tmp_path: Path) -> None:
    async with FakeApiServer(tls=True, client_certs=True) as server:
        server.create(pod("web-1", "shop"))
        cert, key = server.issue_client_cert("alice")
        (tmp_path / "alice.crt").write_bytes(cert)
        (tmp_path / "alice.key").write_bytes(key)
        config = write_kubeconfig(tmp_path / "config", server,
                                  {"client-certificate": "alice.crt", "client-key": "alice.key"})
        connection = await connect(config)
        informer = Informer(connection.api, PODS, backoff=FAST)
        task = asyncio.create_task(informer.run())
        try:
            await asyncio.wait_for(informer.synced.wait(), 5)
            assert set(informer.cache) == {"shop/web-1"}
            await eventually(lambda: server.watchers("Pod") == 1, "the watch over mutual TLS")
            server.create(pod("web-2", "shop"))
            await eventually(lambda: "shop/web-2" in informer.cache, "a watch event")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await connection.close()
        assert set(credentials_seen(server)) == {"cert alice"}
        # Without the key pair the same server refuses the client.
        anonymous = await connect(write_kubeconfig(tmp_path / "anonymous", server, {}))
        try:
            assert await status_of(anonymous.api) == 401
        finally:
            await anonymous.close()


async def test_client_certificate_data_fields(tmp_path: Path) -> None:
    async with FakeApiServer(tls=True, client_certs=True) as server:
        cert, key = server.issue_client_cert("bob")
        connection = await connect(write_kubeconfig(
            tmp_path / "config", server, {"client-certificate-data": b64(cert), "client-key-data": b64(key)}))
        try:
            assert await status_of(connection.api) == 200
        finally:
            await connection.close()
        assert credentials_seen(server) == ["cert bob"]


async def test_token_and_token_file(tmp_path: Path) -> None:
    async with FakeApiServer(tls=True, token="s3cret") as server:
        (tmp_path / "token").write_text("s3cret\n")
        for user in ({"token": "s3cret"}, {"tokenFile": "token"}):
            connection = await connect(write_kubeconfig(tmp_path / "config", server, user))
            try:
                assert await status_of(connection.api) == 200
            finally:
                await connection.close()
        assert credentials_seen(server) == ["Bearer s3cret"] * 2


async def test_insecure_skip_tls_verify_and_a_server_that_is_not_trusted(tmp_path: Path) -> None:
    async with FakeApiServer(tls=True) as server:
        connection = await connect(write_kubeconfig(tmp_path / "insecure", server, {},
                                                    **{"insecure-skip-tls-verify": True}))
        try:
            assert await status_of(connection.api) == 200
        finally:
            await connection.close()
        untrusted = await connect(write_kubeconfig(tmp_path / "untrusted", server.url, {}))  # the system's roots
        try:
            with pytest.raises(CertificateError, match=r"^GET https://127\.0\.0\.1:\d+/api/v1/pods: the certificate "):
                await status_of(untrusted.api)
        finally:
            await untrusted.close()


async def test_tls_server_name_is_the_name_verified(tmp_path: Path) -> None:
    async with FakeApiServer(tls=True) as server:  # its certificate names 127.0.0.1 and localhost
        right = await connect(write_kubeconfig(tmp_path / "right", server, {}, **{"tls-server-name": "localhost"}))
        wrong = await connect(write_kubeconfig(tmp_path / "wrong", server, {}, **{"tls-server-name": "kube.example"}))
        try:
            assert await status_of(right.api) == 200
            with pytest.raises(CertificateError, match=r"kube\.example"):
                await status_of(wrong.api)
        finally:
            await right.close()
            await wrong.close()


async def test_merged_kubeconfig_variable_and_context_choice(tmp_path: Path) -> None:
    async with FakeApiServer(token="b-token") as server:
        # a: names the current context, defined in b; b: the cluster and user, and a context to a dead server.
        a = tmp_path / "a.yaml"
        a.write_text(yaml.safe_dump({"current-context": "live", "users": [{"name": "u", "user": {"token": "wrong"}}]}))
        b = tmp_path / "b" / "config"
        b.parent.mkdir()
        (b.parent / "token").write_text("b-token")
        b.write_text(yaml.safe_dump({
            "current-context": "dead",
            "clusters": [{"name": "live", "cluster": {"server": server.url}},
                         {"name": "dead", "cluster": {"server": "http://127.0.0.1:9"}}],
            "users": [{"name": "u", "user": {"tokenFile": "token"}}, {"name": "b", "user": {"tokenFile": "token"}}],
            "contexts": [{"name": "live", "context": {"cluster": "live", "user": "b"}},
                         {"name": "dead", "context": {"cluster": "dead", "user": "b"}},
                         {"name": "a-user", "context": {"cluster": "live", "user": "u"}}]}))
        environ = {"KUBECONFIG": os.pathsep.join([str(a), str(tmp_path / "missing"), str(b)])}
        for context, expected in ((None, 200), ("a-user", 401)):  # a's user "u" wins over b's
            connection = await connect(None, context=context, environ=environ)
            try:
                assert await status_of(connection.api) == expected
                assert connection.origin == f"{a}{os.pathsep}{b}"
            finally:
                await connection.close()
        dead = await connect(None, context="dead", environ=environ)
        try:
            with pytest.raises(ConnectError, match=r"^GET http://127\.0\.0\.1:9/api/v1/pods: cannot connect to "):
                await status_of(dead.api)
        finally:
            await dead.close()
        with pytest.raises(KubeConfigError, match=r"context 'nope' .* is not defined"):
            await connect(None, context="nope", environ=environ)


# -- the in-cluster service account token, rotated -----------------------------------------------------


async def test_in_cluster_token_is_re_read_every_period(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with FakeApiServer(tls=True, token="one") as server:
        environ = server.write_service_account(tmp_path / "sa")
        token = tmp_path / "sa" / "token"
        client = KubeClient(in_cluster(tmp_path / "sa", environ), token_reload=0.5)
        try:
            assert await status_of(client) == 200
            # The kubelet rotates the token: the client keeps the one it read until the period is over...
            token.write_text("two")
            assert await status_of(client) == 200
            server.token = "two"
            await asyncio.sleep(0.6)
            # ...then reads the file again.
            assert await status_of(client) == 200
            assert credentials_seen(server) == ["Bearer one", "Bearer one", "Bearer two"]
            # A 401 makes it read the file again at once, without waiting for the period.
            token.write_text("three")
            server.token = "three"
            assert await status_of(client) == 401
            assert await status_of(client) == 200
            assert credentials_seen(server)[-2:] == ["Bearer two", "Bearer three"]
            # A file that cannot be read (being replaced) keeps the last token, and says so.
            token.unlink()
            await asyncio.sleep(0.6)
            with caplog.at_level(logging.WARNING, "agent.kube.credentials"):
                assert await status_of(client) == 200
            assert f"cannot re-read the token file {token}" in caplog.text
            assert credentials_seen(server)[-1] == "Bearer three"
        finally:
            await client.close()


async def test_in_cluster_without_a_token_file_is_a_config_error(tmp_path: Path) -> None:
    async with FakeApiServer(tls=True, token="one") as server:
        environ = server.write_service_account(tmp_path / "sa")
        (tmp_path / "sa" / "token").unlink()
        with pytest.raises(KubeConfigError, match=r"in-cluster config .*: token file .*token: No such file"):
            await connect(None, service_account=tmp_path / "sa", environ=environ)


# -- exec credential plugins -------------------------------------------------------------------------------

PLUGIN = """#!{python}
# An exec credential plugin for tests: does what behaviour.json beside it says, logs each run to runs.
import datetime, json, os, sys, time
from pathlib import Path

here = Path(__file__).parent
with open(here / "runs", "a") as log:
    log.write(json.dumps({{"info": json.loads(os.environ["KUBERNETES_EXEC_INFO"]), "args": sys.argv[1:],
                          "env": os.environ.get("PLUGIN_SETTING"), "pid": os.getpid(),
                          "stdin": sys.stdin.read()}}) + "\\n")
behaviour = json.loads((here / "behaviour.json").read_text())
time.sleep(behaviour.get("sleep", 0))
if behaviour.get("exit"):
    sys.stderr.write(behaviour.get("stderr", ""))
    sys.exit(behaviour["exit"])
answer = behaviour["answer"]
if "lifetime" in behaviour:
    expiry = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=behaviour["lifetime"])
    answer["status"]["expirationTimestamp"] = expiry.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
sys.stdout.write(answer if isinstance(answer, str) else json.dumps(answer))
"""


class Plugin:
    """The script above in ``directory``, and what it is to answer."""

    def __init__(self, directory: Path, api_version: str = EXEC_V1) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.dir, self.api_version = directory, api_version
        self.path = directory / "plugin"
        self.path.write_text(PLUGIN.format(python=sys.executable))
        self.path.chmod(0o755)

    def behave(self, **behaviour: Any) -> None:
        (self.dir / "behaviour.json").write_text(json.dumps(behaviour))

    def token(self, token: str, lifetime: float | None = None) -> None:
        answer = {"apiVersion": self.api_version, "kind": "ExecCredential", "status": {"token": token}}
        self.behave(answer=answer, **({} if lifetime is None else {"lifetime": lifetime}))

    def runs(self) -> list[dict[str, Any]]:
        path = self.dir / "runs"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def user(self, **spec: Any) -> dict[str, Any]:
        return {"exec": {"apiVersion": self.api_version, "command": "./plugin/plugin", "args": ["get-token"],
                         "env": [{"name": "PLUGIN_SETTING", "value": "from-kubeconfig"}],
                         "interactiveMode": "IfAvailable", **spec}}


@pytest.fixture
async def tls_server() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(tls=True, token="t1") as s:
        yield s


async def test_exec_plugin_token_and_what_it_is_told(tmp_path: Path, tls_server: FakeApiServer) -> None:
    plugin = Plugin(tmp_path / "plugin")
    plugin.token("t1")
    extension = {"name": "client.authentication.k8s.io/exec", "extension": {"audience": "kube"}}
    config = write_kubeconfig(tmp_path / "config", tls_server, plugin.user(provideClusterInfo=True),
                              extensions=[extension])
    connection = await connect(config)
    try:
        assert len(plugin.runs()) == 1  # run by connect(): a broken plugin is a start-up error
        for _ in range(3):
            assert await status_of(connection.api) == 200
    finally:
        await connection.close()
    (run,) = plugin.runs()  # no expiry: the token is kept
    assert run["args"] == ["get-token"] and run["env"] == "from-kubeconfig" and run["stdin"] == ""
    assert run["info"] == {"apiVersion": EXEC_V1, "kind": "ExecCredential", "spec": {
        "interactive": False, "cluster": {"server": tls_server.url, "config": {"audience": "kube"},
                                          "certificate-authority-data": b64(tls_server.ca_pem or b"")}}}
    assert credentials_seen(tls_server) == ["Bearer t1"] * 3


async def test_exec_plugin_is_run_again_before_its_token_expires(tmp_path: Path, tls_server: FakeApiServer) -> None:
    plugin = Plugin(tmp_path / "plugin", EXEC_V1BETA1)
    plugin.token("t1", lifetime=4.0)  # re-run a quarter of its life (1 s) before it expires
    connection = await connect(write_kubeconfig(tmp_path / "config", tls_server, plugin.user()))
    started = time.monotonic()
    try:
        assert await status_of(connection.api) == 200
        assert len(plugin.runs()) == 1
        tls_server.token = "t2"
        plugin.token("t2", lifetime=4.0)
        await asyncio.sleep(max(0.0, 3.2 - (time.monotonic() - started)))
        assert await status_of(connection.api) == 200
        assert len(plugin.runs()) == 2
        assert credentials_seen(tls_server) == ["Bearer t1", "Bearer t2"]
    finally:
        await connection.close()


async def test_a_failed_early_re_run_keeps_the_credential_until_it_expires(
        tmp_path: Path, tls_server: FakeApiServer, caplog: pytest.LogCaptureFixture) -> None:
    plugin = Plugin(tmp_path / "plugin")
    plugin.token("t1", lifetime=5.0)  # re-run 1.25 s before it expires
    connection = await connect(write_kubeconfig(tmp_path / "config", tls_server, plugin.user()))
    started = time.monotonic()
    try:
        fails(plugin)
        await asyncio.sleep(max(0.0, 3.9 - (time.monotonic() - started)))
        with caplog.at_level(logging.WARNING, "agent.kube.credentials"):
            assert await status_of(connection.api) == 200  # the re-run failed; t1 still works
            assert await status_of(connection.api) == 200  # and the plugin is not run on every request
        assert len(plugin.runs()) == 2
        assert "exited with status 3" in caplog.text and "stays in use until it expires" in caplog.text
        await asyncio.sleep(max(0.0, 5.2 - (time.monotonic() - started)))
        with pytest.raises(KubeConfigError, match="exited with status 3"):  # expired: no credential now
            await status_of(connection.api)
    finally:
        await connection.close()


async def test_exec_plugin_is_run_again_after_a_401(tmp_path: Path, tls_server: FakeApiServer) -> None:
    plugin = Plugin(tmp_path / "plugin")
    plugin.token("t1")
    connection = await connect(write_kubeconfig(tmp_path / "config", tls_server, plugin.user()))
    try:
        tls_server.token = "t2"  # revoked on the server's side
        plugin.token("t2")
        assert await status_of(connection.api) == 401
        assert await status_of(connection.api) == 200
        assert len(plugin.runs()) == 2
    finally:
        await connection.close()


async def test_exec_plugin_client_certificate(tmp_path: Path) -> None:
    async with FakeApiServer(tls=True, client_certs=True) as server:
        cert, key = server.issue_client_cert("plugin-user")
        plugin = Plugin(tmp_path / "plugin", EXEC_V1BETA1)
        plugin.behave(answer={"apiVersion": EXEC_V1BETA1, "kind": "ExecCredential",
                              "status": {"clientCertificateData": cert.decode(), "clientKeyData": key.decode()}})
        connection = await connect(write_kubeconfig(tmp_path / "config", server, plugin.user()))
        try:
            assert await status_of(connection.api) == 200
        finally:
            await connection.close()
        assert credentials_seen(server) == ["cert plugin-user"]


def not_an_exec_credential(plugin: Plugin) -> None:
    plugin.behave(answer="this is not JSON")


def wrong_api_version(plugin: Plugin) -> None:
    plugin.behave(answer={"apiVersion": EXEC_V1BETA1, "kind": "ExecCredential", "status": {"token": "t"}})


def no_credential(plugin: Plugin) -> None:
    plugin.behave(answer={"apiVersion": EXEC_V1, "kind": "ExecCredential", "status": {}})


def half_a_key_pair(plugin: Plugin) -> None:
    plugin.behave(answer={"apiVersion": EXEC_V1, "kind": "ExecCredential", "status": {"clientKeyData": "k"}})


def bad_expiry(plugin: Plugin) -> None:
    plugin.behave(answer={"apiVersion": EXEC_V1, "kind": "ExecCredential",
                          "status": {"token": "t", "expirationTimestamp": "tomorrow"}})


def bad_key_pair(plugin: Plugin) -> None:
    plugin.behave(answer={"apiVersion": EXEC_V1, "kind": "ExecCredential",
                          "status": {"clientCertificateData": "not PEM", "clientKeyData": "not PEM"}})


def fails(plugin: Plugin) -> None:
    plugin.behave(exit=3, stderr="error: you must be logged in to the server\n")


@pytest.mark.parametrize(("setup", "message"), [
    (fails, "exited with status 3: error: you must be logged in to the server$"),
    (not_an_exec_credential, "its output is not an ExecCredential in JSON"),
    (wrong_api_version, f"it answered apiVersion '{EXEC_V1BETA1}', the kubeconfig asks for {EXEC_V1}$"),
    (no_credential, "status has neither a token nor clientCertificateData and clientKeyData$"),
    (half_a_key_pair, "status has only one of clientCertificateData and clientKeyData$"),
    (bad_expiry, "status.expirationTimestamp 'tomorrow' is not an RFC 3339 time$"),
    (bad_key_pair, "exec plugin's clientCertificateData, clientKeyData: not a PEM certificate and its key"),
])
async def test_a_failing_exec_plugin_is_a_config_error_naming_it(tmp_path: Path, tls_server: FakeApiServer,
                                                                 setup: Any, message: str) -> None:
    plugin = Plugin(tmp_path / "plugin")
    setup(plugin)
    config = write_kubeconfig(tmp_path / "config", tls_server, plugin.user())
    with pytest.raises(KubeConfigError, match=f"^kubeconfig {config}: user 'fake': .*{message}"):
        connection = await connect(config)
        try:  # the key pair is only loaded for a request over TLS
            await status_of(connection.api)
        finally:
            await connection.close()


async def test_a_missing_exec_plugin_gives_its_install_hint(tmp_path: Path, tls_server: FakeApiServer) -> None:
    config = write_kubeconfig(tmp_path / "config", tls_server, {"exec": {
        "apiVersion": EXEC_V1, "command": "no-such-auth-plugin", "interactiveMode": "Never",
        "installHint": "install no-such-auth-plugin from example.com"}})
    with pytest.raises(KubeConfigError, match=f"^kubeconfig {config}: user 'fake': exec plugin no-such-auth-plugin: "
                                              "cannot run it: No such file or directory; install no-such-auth-plugin"):
        await connect(config)


async def test_an_exec_plugin_that_needs_a_terminal_is_refused(tmp_path: Path, tls_server: FakeApiServer) -> None:
    plugin = Plugin(tmp_path / "plugin")
    plugin.token("t1")
    config = write_kubeconfig(tmp_path / "config", tls_server, plugin.user(interactiveMode="Always"))
    with pytest.raises(KubeConfigError, match="interactiveMode Always needs a terminal"):
        await connect(config)
    assert plugin.runs() == []


async def test_an_exec_plugin_that_hangs_is_killed(tmp_path: Path, tls_server: FakeApiServer) -> None:
    plugin = Plugin(tmp_path / "plugin")
    plugin.behave(sleep=30)
    access = load_kubeconfig(kubeconfig_files(write_kubeconfig(tmp_path / "config", tls_server, plugin.user()), {}))
    assert access.user.exec is not None
    source = ExecPlugin(access.user.exec, access, access.user.where, timeout=0.5)
    with pytest.raises(KubeConfigError, match=r"no answer within 0\.5 s"):
        await source.get()
    await eventually(plugin.runs, "the plugin started")
    assert gone(plugin.runs()[0]["pid"]), "the plugin was killed and reaped"


def gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()


async def test_informers_survive_a_plugin_that_fails_for_a_while(tmp_path: Path, tls_server: FakeApiServer,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    plugin = Plugin(tmp_path / "plugin")
    plugin.token("t1")
    tls_server.create(pod("web-1", "shop"))
    connection = await connect(write_kubeconfig(tmp_path / "config", tls_server, plugin.user()))
    informer = Informer(connection.api, PODS, backoff=FAST)
    task = asyncio.create_task(informer.run())
    try:
        await asyncio.wait_for(informer.synced.wait(), 5)
        await eventually(lambda: tls_server.watchers("Pod") == 1, "watching")
        tls_server.token = "t2"  # the token is revoked, and the plugin cannot get a new one for now
        fails(plugin)
        with caplog.at_level(logging.ERROR, "agent.kube.informer"):
            tls_server.drop_watches()
            await eventually(lambda: "exited with status 3" in caplog.text, "the plugin's failure logged")
        assert not [r for r in caplog.records if r.exc_info], "logged as a configuration problem, not a crash"
        plugin.token("t2")  # the plugin works again: the informer resumes without anyone restarting it
        tls_server.create(pod("web-2", "shop"))
        await eventually(lambda: "shop/web-2" in informer.cache, "the informer resumed", within=10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await connection.close()


# -- a command line's --context -------------------------------------------------------------------------------


async def test_policy_explain_reads_the_cluster_of_the_context_given(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    async with FakeApiServer() as server:
        server.create(namespace("shop", {"istio.io/dataplane-mode": "ambient"}))
        server.create(pod("web", "shop", ip="10.0.0.1", node="node-1", service_account="web"))
        server.create(pod("db", "shop", ip="10.0.1.1", node="node-2", service_account="db"))
        config = tmp_path / "config"
        config.write_text(yaml.safe_dump({
            "current-context": "dead",
            "clusters": [{"name": "live", "cluster": {"server": server.url}},
                         {"name": "dead", "cluster": {"server": "http://127.0.0.1:9"}}],
            "contexts": [{"name": "live", "context": {"cluster": "live"}},
                         {"name": "dead", "context": {"cluster": "dead"}}]}))
        argv = ["explain", "shop/web", "db:5432", "--kubernetes", "--kubeconfig", str(config), "--context", "live"]
        assert await asyncio.to_thread(policy_main, argv) == 0  # its own event loop, in a thread
    assert "decision: ALLOW" in capsys.readouterr().out
