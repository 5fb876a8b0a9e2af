"""The certificate manager: on-demand fetch, coalescing, renewal, backoff, forgetting, trust bundle reloads.

Scheduling is tested with an injected clock and sleep (ManualTime) and an in-process CA client that signs
with a real CertificateAuthority; tests/integration/test_identity_over_grpc.py runs it against the real gRPC CA.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from pathlib import Path

import pytest
from cryptography import x509

from agent.ca.authority import DEFAULT_TTL, CertificateAuthority
from agent.identity.ca_client import CaRequestError
from agent.identity.manager import RENEWAL_BACKOFF, CertificateManager, CertificateUnavailable
from agent.retry import Backoff
from agent.rpc import StatusCode
from hbone.identity import (
    SpiffeId,
    TrustBundle,
    WorkloadCertificate,
)
from tests.fixtures.ca_lab import ManualTime, rewrite
from tests.fixtures.certificates import spiffe

WEB = spiffe("shop", "web")
PLAIN = spiffe("misc", "default")
# 24 h certificates are backdated 1 min, and X.509 times have whole seconds.
HALF_DAY = pytest.approx(((DEFAULT_TTL + dt.timedelta(minutes=1)) / 2 - dt.timedelta(minutes=1)).total_seconds(),
                         abs=1.0)


class LocalCa:
    """A CA client that signs in-process with a real authority, for scheduling tests without gRPC.
    ``failing`` makes calls fail; ``gate`` holds calls until set."""

    def __init__(self, authority: CertificateAuthority) -> None:
        self.authority = authority
        self.calls = 0
        self.failing: Exception | None = None
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()
        self.bundles: list[TrustBundle] = []

    async def create_certificate(self, csr_pem: bytes, identity: SpiffeId | None,
                                 validity: dt.timedelta | None = None) -> list[bytes]:
        assert identity is not None
        self.calls += 1
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.failing is not None:
            raise self.failing
        return self.authority.sign_csr(csr_pem, identity, validity or DEFAULT_TTL)

    def set_trust_bundle(self, bundle: TrustBundle) -> None:
        self.bundles.append(bundle)


DOWN = CaRequestError(StatusCode.UNAVAILABLE, "CA is down")


def local(time: ManualTime, **kw: object) -> tuple[CertificateManager, LocalCa, CertificateAuthority]:
    authority = CertificateAuthority.create("cluster.local")
    authority.clock = time.clock
    ca = LocalCa(authority)
    manager = CertificateManager(ca, authority.trust_bundle, clock=time.clock, sleep=time.sleep,
                                 **kw)  # type: ignore[arg-type]
    return manager, ca, authority


def serial(cert: WorkloadCertificate) -> int:
    return x509.load_pem_x509_certificate(cert.chain_pem).serial_number


def test_backoff_doubles_from_one_second_to_150_with_jitter() -> None:
    b = RENEWAL_BACKOFF
    assert [b.delay(n, 0.0) for n in range(1, 11)] == [1, 2, 4, 8, 16, 32, 64, 128, 150, 150]
    assert b.delay(10_000, 0.0) == 150
    assert b.delay(1, 0.999) == pytest.approx(0.8, abs=0.001)  # jitter takes off at most 20 %
    assert 120 <= b.delay(9, 0.5) <= 150


async def test_concurrent_gets_coalesce_into_one_request() -> None:
    time = ManualTime()
    manager, ca, _ = local(time)
    ca.gate = asyncio.Event()
    assert manager.at_hand(WEB) is None  # not fetched yet
    waiters = [asyncio.create_task(manager.get(WEB)) for _ in range(50)]
    await ca.entered.wait()
    assert manager.at_hand(WEB) is None  # being fetched
    assert [s.state for s in manager.status()] == ["initializing"]
    ca.gate.set()
    certs = await asyncio.gather(*waiters)
    assert ca.calls == 1
    assert all(c is certs[0] for c in certs)
    assert await manager.get(WEB) is certs[0] and manager.at_hand(WEB) is certs[0]  # cached
    assert ca.calls == 1
    await manager.close()


async def test_renews_in_the_background_at_half_of_the_lifetime() -> None:
    time = ManualTime()
    manager, ca, _ = local(time)
    first = await manager.get(WEB)
    wait = await time.next_sleep()
    assert wait == HALF_DAY
    assert abs(time.now + dt.timedelta(seconds=wait) - first.refresh_at) < dt.timedelta(milliseconds=1)
    time.advance(wait - 1)
    await asyncio.sleep(0)
    assert ca.calls == 1 and await manager.get(WEB) is first  # not yet
    time.advance(1)
    assert await time.next_sleep() == HALF_DAY
    second = await manager.get(WEB)
    assert ca.calls == 2
    assert serial(second) != serial(first)
    assert second.key_pem != first.key_pem  # a fresh key for every certificate
    await manager.close()


async def test_identities_renew_each_at_its_own_time_with_one_task_for_all() -> None:
    """Between fetches an identity holds no task of its own (issue 11: three per identity cost 0.45 MiB at 100):
    one scheduler, sleeping until the earliest renewal, starts each."""
    time = ManualTime()
    manager, ca, _ = local(time)

    async def settled(calls: int) -> None:
        """Wait until the CA saw ``calls`` requests and the manager is idle: its scheduler sleeping, and nothing
        else of it running (the scheduler, its sleep and its wake-up are its only tasks)."""
        async with asyncio.timeout(10):
            while (ca.calls < calls or time.sleeping != 1  # noqa: ASYNC110 (polling is the point)
                   or len(asyncio.all_tasks() - {asyncio.current_task()}) != 3):
                await asyncio.sleep(0.01)
        others = asyncio.all_tasks() - {asyncio.current_task()}
        assert ca.calls == calls and len(others) == 3, (ca.calls, others)

    try:
        early = {i: await manager.get(i) for i in [spiffe("a", f"sa-{n}") for n in range(20)]}
        time.advance(3600)
        late = await manager.get(WEB)
        await settled(21)
        first = min(c.refresh_at for c in early.values())
        time.advance((first - time.now).total_seconds() + 1)  # the 20 early ones are due, WEB is not
        await settled(41)
        assert await manager.get(WEB) is late and all([await manager.get(i) is not c for i, c in early.items()])
        time.advance((late.refresh_at - time.now).total_seconds())
        await settled(42)
        assert await manager.get(WEB) is not late
    finally:
        await manager.close()


async def test_failed_renewals_back_off_while_the_old_certificate_stays_in_use() -> None:
    time = ManualTime()
    manager, ca, _ = local(time, backoff=RENEWAL_BACKOFF, rand=lambda: 0.0)
    first = await manager.get(WEB)
    wait = await time.next_sleep()
    ca.failing = DOWN
    delays = []
    for _ in range(10):
        time.advance(wait)
        wait = await time.next_sleep()
        delays.append(wait)
        assert await manager.get(WEB) is first
    assert delays == [1, 2, 4, 8, 16, 32, 64, 128, 150, 150]
    (status,) = manager.status()
    assert status.state == "renewing" and status.failures == 10
    assert status.last_error is not None and "CA is down" in status.last_error
    assert status.next_attempt == time.now + dt.timedelta(seconds=150)
    ca.failing = None
    time.advance(wait)
    assert await time.next_sleep() == HALF_DAY  # back to the normal rhythm
    second = await manager.get(WEB)
    assert serial(second) != serial(first)
    assert manager.status()[0].failures == 0 and manager.status()[0].state == "available"
    assert ca.calls == 12
    await manager.close()


async def test_first_fetch_failure_fails_fast_until_a_retry_succeeds() -> None:
    time = ManualTime()
    manager, ca, _ = local(time, backoff=Backoff(initial=1.0, cap=150.0, jitter=0.0))
    ca.failing = DOWN
    with pytest.raises(CertificateUnavailable, match="CA is down"):
        await manager.get(WEB)
    assert await time.next_sleep() == 1.0
    with pytest.raises(CertificateUnavailable):  # answered at once, no new request to the CA
        await manager.get(WEB)
    assert ca.calls == 1
    assert manager.status()[0].state == "unavailable"
    ca.failing = None
    time.advance(1.0)
    await time.next_sleep()
    assert (await manager.get(WEB)).identity == WEB
    assert ca.calls == 2
    await manager.close()


async def test_an_expired_certificate_is_not_handed_out() -> None:
    time = ManualTime()
    manager, ca, _ = local(time, validity=dt.timedelta(hours=1),
                           backoff=Backoff(initial=1000, cap=1000, jitter=0.0))
    first = await manager.get(WEB)
    ca.failing = DOWN
    time.advance(await time.next_sleep())  # half-life: renewal fails
    assert await time.next_sleep() == 1000
    assert await manager.get(WEB) is first
    while time.now < first.not_after:  # retries keep failing until the certificate has run out
        assert await manager.get(WEB) is first and manager.at_hand(WEB) is first
        time.advance(1000)
        assert await time.next_sleep() == 1000
    assert manager.at_hand(WEB) is None  # expired: not at hand, and get says why
    with pytest.raises(CertificateUnavailable, match="expired"):
        await manager.get(WEB)
    assert manager.status()[0].state == "expired"
    await manager.close()


async def test_forget_stops_renewing_and_releases_waiters() -> None:
    time = ManualTime()
    manager, ca, _ = local(time)
    ca.gate = asyncio.Event()
    waiter = asyncio.create_task(manager.get(WEB))
    await ca.entered.wait()
    manager.forget(WEB)
    with pytest.raises(CertificateUnavailable, match="forgotten"):
        await waiter
    assert manager.identities() == []
    ca.gate.set()
    first = await manager.get(WEB)  # asking again starts afresh
    assert ca.calls == 2
    await time.next_sleep()
    manager.forget(WEB)
    manager.forget(WEB)  # twice is harmless
    assert manager.status() == []
    second = await manager.get(WEB)
    assert ca.calls == 3 and serial(second) != serial(first)
    await manager.close()


async def test_certificates_that_do_not_verify_are_refused() -> None:
    time = ManualTime()
    manager, ca, _ = local(time, backoff=Backoff(initial=1.0, cap=150.0, jitter=0.0))
    ca.authority = CertificateAuthority.create("cluster.local")  # a CA whose root we do not trust
    with pytest.raises(CertificateUnavailable, match="does not chain"):
        await manager.get(WEB)
    await manager.close()

    class SwappingCa(LocalCa):
        async def create_certificate(self, csr_pem: bytes, identity: SpiffeId | None,
                                     validity: dt.timedelta | None = None) -> list[bytes]:
            other = self.authority.issue(spiffe("shop", "other"))  # somebody else's certificate and key
            return [other.chain_pem, self.authority.root_pem]

    authority = CertificateAuthority.create("cluster.local")
    manager = CertificateManager(SwappingCa(authority), authority.trust_bundle, clock=time.clock,
                                 sleep=time.sleep)
    with pytest.raises(CertificateUnavailable, match="does not match"):
        await manager.get(WEB)
    with pytest.raises(CertificateUnavailable, match="outside trust domain"):
        await manager.get(SpiffeId("other.domain", "shop", "web"))
    await manager.close()


async def test_status_lists_identities_and_expiry_without_keys() -> None:
    time = ManualTime()
    manager, _, _ = local(time)
    web, plain = await manager.get(WEB), await manager.get(PLAIN)
    status = manager.status()
    assert [s.identity for s in status] == [PLAIN, WEB]
    assert status[1].not_after == web.not_after and status[0].not_after == plain.not_after
    assert status[1].refresh_at == web.refresh_at and status[1].state == "available"
    dumped = json.dumps([s.as_dict() for s in status])
    assert "PRIVATE KEY" not in dumped and "CERTIFICATE" not in dumped
    assert json.loads(dumped)[1]["identity"] == str(WEB)
    await manager.close()


async def test_trust_bundle_file_is_reloaded(tmp_path: Path) -> None:
    time = ManualTime()
    old = CertificateAuthority.create("cluster.local")
    new = CertificateAuthority.create("cluster.local")
    path = tmp_path / "root-cert.pem"
    rewrite(path, old.root_pem.decode())
    ca = LocalCa(old)
    manager = CertificateManager(ca, old.trust_bundle, trust_bundle_file=path, clock=time.clock,
                                 sleep=time.sleep)
    assert len(manager.trust_bundle.roots) == 1
    rewrite(path, (old.root_pem + new.root_pem).decode())
    assert len(manager.trust_bundle.roots) == 1  # checked at most every 5 s
    time.advance(5)
    assert len(manager.trust_bundle.roots) == 2
    assert ca.bundles[-1] == manager.trust_bundle  # the CA client verifies the CA with it too
    rewrite(path, "-----BEGIN CERTIFICATE-----\nhalf written")
    time.advance(5)
    assert len(manager.trust_bundle.roots) == 2  # a broken file keeps the last good bundle
    # A certificate from a root not yet known makes the manager look at the file at once.
    newer = CertificateAuthority.create("cluster.local")
    rewrite(path, newer.root_pem.decode())
    ca.authority = newer
    assert (await manager.get(WEB)).identity == WEB
    assert manager.trust_bundle.roots_pem == newer.root_pem
    await manager.close()
