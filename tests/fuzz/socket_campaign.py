"""Hostile sessions against a real ``ambit hbone serve`` on loopback, while a legitimate client works.

Four processes: the server under test (``ambit hbone serve``, its log kept), an upstream echo server, a
legitimate client (a Forwarder and Pool, as ``python -m hbone forward`` runs them: a new CONNECT stream for
each 1 KiB round trip, timed), and this one, the attacker. The attacker runs ``sessions`` sessions, at most
``concurrency`` at once, each bounded in time: most present a valid workload certificate and send what
``tests.fuzz.h2gen`` generates for the session's seed (cut into reads, sometimes paced, sometimes never
reading), the others try TLS variants a mesh must refuse (no certificate, another CA, expired, another
trust domain, TLS 1.2, another ALPN, plaintext, a stalled handshake). Every address is on loopback.

Reported: sessions and rate; the server's RSS (before, peak, after) and open fds (before, after); error
lines and tracebacks in its log; the legitimate client's round trips, failures, and p50/p99 quiet and
under attack.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import multiprocessing
import os
import re
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from typing import Any

from agent.ca.authority import CertificateAuthority
from hbone import Authority, Forwarder, Pool, SpiffeId, TrustBundle, WorkloadCertificate
from hbone.identity import ALPN, client_context
from tests.fuzz.h2gen import ClientScript, RandomSource, reads

TRUST_DOMAIN = "cluster.local"
SERVER_ID = SpiffeId(TRUST_DOMAIN, "default", "server")
CLIENT_ID = SpiffeId(TRUST_DOMAIN, "default", "client")
SESSION_SECONDS = 3.0
ROUND_TRIP = 1024


@dataclasses.dataclass
class Report:
    sessions: int = 0
    seconds: float = 0.0
    variants: dict[str, int] = dataclasses.field(default_factory=dict)
    attacker_errors: dict[str, int] = dataclasses.field(default_factory=dict)  # the attacker's own, by kind
    rss_before_kib: int = 0
    rss_peak_kib: int = 0
    rss_after_kib: int = 0
    fds_before: int = 0
    fds_after: int = 0
    log_errors: int = 0
    log_tracebacks: int = 0
    log_lines: int = 0
    server_alive: bool = True
    legit_quiet: list[float] = dataclasses.field(default_factory=list)
    legit_attack: list[float] = dataclasses.field(default_factory=list)
    legit_failures: int = 0
    refused_answered: int = 0  # refused TLS variants that got bytes back
    legit_failure_reasons: list[str] = dataclasses.field(default_factory=list)

    @staticmethod
    def _p(values: list[float], q: int) -> float:
        return statistics.quantiles(values, n=100)[q - 1] * 1e3 if len(values) >= 2 else float("nan")

    def lines(self) -> list[str]:
        rate = self.sessions / self.seconds if self.seconds else 0.0
        return [
            f"hostile sessions: {self.sessions} in {self.seconds:.1f} s ({rate:.0f}/s); variants {self.variants}",
            f"server RSS: {self.rss_before_kib / 1024:.1f} MiB before, {self.rss_peak_kib / 1024:.1f} MiB peak, "
            f"{self.rss_after_kib / 1024:.1f} MiB after; open fds {self.fds_before} before, {self.fds_after} after",
            f"server log: {self.log_lines} lines, {self.log_errors} ERROR lines, {self.log_tracebacks} tracebacks;"
            f" server {'alive' if self.server_alive else 'DEAD'}",
            f"legitimate client: {len(self.legit_quiet) + len(self.legit_attack)} round trips, "
            f"{self.legit_failures} failures; p50/p99 quiet {self._p(self.legit_quiet, 50):.2f}/"
            f"{self._p(self.legit_quiet, 99):.2f} ms, under attack {self._p(self.legit_attack, 50):.2f}/"
            f"{self._p(self.legit_attack, 99):.2f} ms",
            f"attacker-side outcomes (not findings): {self.attacker_errors}",
        ]

    @property
    def findings(self) -> list[str]:
        found = []
        if self.log_errors or self.log_tracebacks:
            found.append(f"{self.log_errors} error lines and {self.log_tracebacks} tracebacks in the server log")
        if self.refused_answered:
            found.append(f"{self.refused_answered} refused TLS clients were answered")
        if not self.server_alive:
            found.append("the server died")
        if self.legit_failures:
            found.append(f"{self.legit_failures} legitimate round trips failed: {self.legit_failure_reasons[:3]}")
        if self.fds_after > self.fds_before + 8:
            found.append(f"fds grew from {self.fds_before} to {self.fds_after}")
        if self.rss_after_kib > self.rss_before_kib + 256 * 1024:
            found.append(f"RSS grew from {self.rss_before_kib} to {self.rss_after_kib} KiB")
        return found


@dataclasses.dataclass
class Identities:
    dir: Path
    ca: CertificateAuthority
    server: WorkloadCertificate
    client: WorkloadCertificate

    @classmethod
    def make(cls, directory: Path) -> Identities:
        ca = CertificateAuthority.create(TRUST_DOMAIN)
        server, client = ca.issue(SERVER_ID), ca.issue(CLIENT_ID)
        (directory / "server.pem").write_bytes(server.chain_pem)
        (directory / "server.key").write_bytes(server.key_pem)
        (directory / "bundle.pem").write_bytes(ca.trust_bundle.roots_pem)
        return cls(directory, ca, server, client)

    def bad_contexts(self) -> dict[str, ssl.SSLContext]:
        """TLS clients the server must refuse before any HTTP/2 byte."""
        past = CertificateAuthority(TRUST_DOMAIN, self.ca.root_cert, self.ca.root_key,
                                    clock=lambda: dt.datetime.now(dt.UTC) - dt.timedelta(days=2))
        other_td = CertificateAuthority("other.domain", self.ca.root_cert, self.ca.root_key)
        bundle = self.ca.trust_bundle
        contexts = {
            "expired": client_context(past.issue(CLIENT_ID, dt.timedelta(hours=1)), bundle),
            "another CA": client_context(CertificateAuthority.create(TRUST_DOMAIN).issue(CLIENT_ID), bundle),
            "another trust domain": client_context(other_td.issue(SpiffeId("other.domain", "a", "b")), bundle),
        }
        bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        bare.check_hostname, bare.verify_mode = False, ssl.CERT_NONE
        bare.set_alpn_protocols([ALPN])
        contexts["no certificate"] = bare
        tls12 = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        tls12.check_hostname, tls12.verify_mode = False, ssl.CERT_NONE
        tls12.maximum_version = ssl.TLSVersion.TLSv1_2
        tls12.load_cert_chain(*self._files(self.client))
        contexts["TLS 1.2"] = tls12
        alpn = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        alpn.check_hostname, alpn.verify_mode = False, ssl.CERT_NONE
        alpn.set_alpn_protocols(["http/1.1"])
        alpn.load_cert_chain(*self._files(self.client))
        contexts["ALPN http/1.1"] = alpn
        return contexts

    def _files(self, cert: WorkloadCertificate) -> tuple[str, str]:
        chain, key = self.dir / "c.pem", self.dir / "c.key"
        chain.write_bytes(cert.chain_pem)
        key.write_bytes(cert.key_pem)
        return str(chain), str(key)


# -- the upstream and the legitimate client, each in its own process


def _upstream(port_out: Any) -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
            writer.write_eof()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(echo, "127.0.0.1", 0, backlog=4096)
        port_out.send(server.sockets[0].getsockname()[1])
        await asyncio.Event().wait()

    asyncio.run(main())


def _legit(hbone: tuple[str, int], upstream: int, pem: tuple[bytes, bytes, bytes], quiet: int,
           stop: EventType, out: Any) -> None:
    import uvloop

    async def main() -> None:
        cert = WorkloadCertificate.from_pem(pem[0], pem[1])
        pool = Pool(TrustBundle(TRUST_DOMAIN, pem[2]))
        fwd = Forwarder(pool, cert, SERVER_ID, hbone, Authority("127.0.0.1", upstream))
        entry = await fwd.start()
        payload = os.urandom(ROUND_TRIP)
        failures: list[str] = []

        async def round_trip() -> float:
            start = time.perf_counter()
            try:
                async with asyncio.timeout(5.0):
                    reader, writer = await asyncio.open_connection(*entry)
                    writer.write(payload)
                    got = await reader.readexactly(ROUND_TRIP)
                    writer.close()
                if got != payload:
                    failures.append("payload differs")
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as e:
                failures.append(f"{type(e).__name__}: {e}")
            return time.perf_counter() - start

        quiet_rtts = [await round_trip() for _ in range(quiet)]
        out.send(("quiet", quiet_rtts, list(failures)))
        failures.clear()
        attack_rtts = []
        while not stop.is_set():
            attack_rtts.append(await round_trip())
            await asyncio.sleep(0.002)
        out.send(("attack", attack_rtts, failures))
        await fwd.close()
        await pool.close()

    uvloop.run(main())


# -- the attacker


async def _drain(reader: asyncio.StreamReader) -> None:
    with contextlib.suppress(ConnectionError, ssl.SSLError, OSError):
        while await reader.read(1 << 16):
            pass


async def _hostile(address: tuple[str, int], ctx: ssl.SSLContext, seed: int, authority: str) -> str:
    """One session with a valid certificate: the generated bytes, paced or not, read or not."""
    src = RandomSource(seed)
    reader, writer = await asyncio.open_connection(*address, ssl=ctx, server_hostname="")
    reading = asyncio.ensure_future(_drain(reader)) if src.pick(0, 9) else None  # one in ten never reads
    try:
        for action in ClientScript(src, authority).session(steps=src.pick(1, 30)):
            for chunk in reads(src, action):
                writer.write(chunk)
                if src.pick(0, 3) == 0:
                    await writer.drain()
                if src.pick(0, 15) == 0:
                    await asyncio.sleep(src.pick(0, 20) / 1000)
        await writer.drain()
        await asyncio.sleep(src.pick(0, 200) / 1000)
    finally:
        if reading is not None:
            reading.cancel()
        if src.pick(0, 1):
            transport = writer.transport
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            transport.abort()
        else:
            writer.close()
    return "hbone"


async def _refused(address: tuple[str, int], ctx: ssl.SSLContext | None, seed: int) -> str:
    """A TLS variant (or none): whatever the server sends back must be no HTTP/2."""
    src = RandomSource(seed)
    if ctx is None:
        reader, writer = await asyncio.open_connection(*address)
        writer.write(src.blob(src.pick(0, 300)))
    else:
        reader, writer = await asyncio.open_connection(*address, ssl=ctx, server_hostname="")
        writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    try:
        async with asyncio.timeout(1.0):
            got = await reader.read(1 << 16)
        if got:
            raise AssertionError(f"the server answered a refused client with {len(got)} bytes")
    except (TimeoutError, ConnectionError, ssl.SSLError, OSError):
        pass
    finally:
        writer.close()
    return "refused"


async def _stalled_handshake(address: tuple[str, int], seed: int) -> str:
    _, writer = await asyncio.open_connection(*address)
    writer.write(bytes.fromhex("160301")[:RandomSource(seed).pick(1, 3)])  # the start of a TLS record
    await asyncio.sleep(0.3)
    writer.close()
    return "stalled"


def _rss_kib(pid: int) -> int:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


async def _attack(report: Report, address: tuple[str, int], ids: Identities, upstream: int, sessions: int,
                  concurrency: int, seed: int, pid: int) -> None:
    good = client_context(ids.client, ids.ca.trust_bundle)
    bad = ids.bad_contexts()
    names = list(bad)
    authority = f"127.0.0.1:{upstream}"
    queue = iter(range(seed, seed + sessions))

    async def worker() -> None:
        for n in queue:
            kind = n % 20
            try:
                async with asyncio.timeout(SESSION_SECONDS):
                    if kind < 16:
                        variant = await _hostile(address, good, n, authority)
                    elif kind < 18:
                        variant = await _refused(address, bad[names[n % len(names)]], n)
                    elif kind == 18:
                        variant = await _refused(address, None, n)
                    else:
                        variant = await _stalled_handshake(address, n)
                report.variants[variant] = report.variants.get(variant, 0) + 1
            except AssertionError:
                report.refused_answered += 1
            except (OSError, ssl.SSLError, TimeoutError, asyncio.IncompleteReadError) as e:
                key = type(e).__name__
                report.attacker_errors[key] = report.attacker_errors.get(key, 0) + 1
            report.sessions += 1

    async def watch() -> None:
        while True:
            report.rss_peak_kib = max(report.rss_peak_kib, _rss_kib(pid))
            await asyncio.sleep(0.25)

    watcher = asyncio.ensure_future(watch())
    start = time.perf_counter()
    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        report.seconds = time.perf_counter() - start
        watcher.cancel()


def run(sessions: int, concurrency: int = 32, seed: int = 0, quiet: int = 300,
        progress: Callable[[str], None] = print) -> Report:
    """The whole campaign; returns its report (``report.findings`` lists what went wrong)."""
    report = Report()
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="hbone-fuzz-") as tmp:
        ids = Identities.make(Path(tmp))
        up_recv, up_send = ctx.Pipe(duplex=False)
        upstream_proc = ctx.Process(target=_upstream, args=(up_send,), daemon=True)
        upstream_proc.start()
        upstream = up_recv.recv()
        log_path = Path(tmp) / "server.log"
        server, address = _start_server(ids, log_path)
        legit = None
        try:
            stop = ctx.Event()
            legit_recv, legit_send = ctx.Pipe(duplex=False)
            pem = (ids.client.chain_pem, ids.client.key_pem, ids.ca.trust_bundle.roots_pem)
            legit = ctx.Process(target=_legit, args=(address, upstream, pem, quiet, stop, legit_send), daemon=True)
            legit.start()
            _, report.legit_quiet, failed = legit_recv.recv()
            report.legit_failure_reasons += failed
            time.sleep(0.5)
            report.rss_before_kib, report.fds_before = _rss_kib(server.pid), _fds(server.pid)
            progress(f"quiet: {len(report.legit_quiet)} round trips; attacking with {sessions} sessions")
            logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # the attacker's own broken sessions
            asyncio.run(_attack(report, address, ids, upstream, sessions, concurrency, seed, server.pid))
            stop.set()
            _, report.legit_attack, failed = legit_recv.recv()
            time.sleep(SESSION_SECONDS + 0.5)  # the server closes what the last sessions left
            report.legit_failure_reasons += failed
            report.legit_failures = len(report.legit_failure_reasons)
            report.rss_after_kib, report.fds_after = _rss_kib(server.pid), _fds(server.pid)
            report.server_alive = server.poll() is None
        finally:
            if legit is not None:
                legit.join(10)
                if legit.is_alive():
                    legit.kill()
            server.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.wait(10)
            if server.poll() is None:
                server.kill()
            upstream_proc.kill()
        text = log_path.read_text(errors="replace")
        report.log_lines = text.count("\n")
        report.log_errors = len(re.findall(r" (?:ERROR|CRITICAL) ", text))
        report.log_tracebacks = text.count("Traceback (most recent call last)")
    return report


def _start_server(ids: Identities, log_path: Path) -> tuple[subprocess.Popen[str], tuple[str, int]]:
    """``ambit hbone serve`` on a free loopback port, logging to ``log_path``."""
    ambit = Path(sys.executable).with_name("ambit")
    command = [str(ambit)] if ambit.exists() else [sys.executable, "-m", "agent.cli"]
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [*command, "hbone", "serve", "--listen", "127.0.0.1:0", "--cert", str(ids.dir / "server.pem"),
             "--key", str(ids.dir / "server.key"), "--bundle", str(ids.dir / "bundle.pem"),
             "--trust-domain", TRUST_DOMAIN], stdout=subprocess.PIPE, stderr=log, text=True)
    assert server.stdout is not None
    m = re.match(r"listening on (\S+):(\d+)", server.stdout.readline())
    if m is None:
        server.kill()
        raise RuntimeError(f"the server did not start; its log: {log_path.read_text()[-2000:]}")
    return server, (m.group(1), int(m.group(2)))
