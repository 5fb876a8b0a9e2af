"""The node agent's certificate manager: workload certificates on demand, kept fresh in the background.

For each identity one fetch runs at a time: the first ``get`` starts it and every concurrent ``get`` waits for
the same request (one RPC however many connections ask at once). After a success the identity is due for renewal
at half of the certificate's lifetime; after a failure it is due again after an exponential backoff (1 s doubling
to 150 s, with jitter) while the previous certificate stays in use until it expires. One scheduler task keeps
every identity's due time and starts each fetch when it comes: an identity between fetches holds no task, timer
or future of its own (the three tasks, Event and futures each one held were 0.49 MiB at 100 identities).
Like ztunnel, an identity whose first fetch failed answers ``get`` at once with the error until a retry
succeeds, instead of piling callers onto the CA.

Every certificate the CA returns is checked before use: it must be for the identity asked for, match the
key made here, and chain to the trust bundle. The trust bundle may hold several roots (a root rotation):
``update_trust_bundle`` adds roots (or replaces them), and a bundle file, when given, is re-read when it
changes. Certificates that no longer chain to a replaced bundle are renewed at once.

Keys, CSRs and chain checks are made in a short-lived worker process (``agent.identity.worker``): the agent itself
reads certificates without a crypto library (``hbone.der``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from agent.identity.worker import X509Worker
from agent.retry import Backoff
from agent.sources.watched import SourceError, WatchedFile
from hbone import IdentityError, SpiffeId, TrustBundle, WorkloadCertificate
from hbone.der import CertificateFields
from hbone.identity import split_pem

log = logging.getLogger("ambit.ca.manager")

Clock = Callable[[], dt.datetime]
Sleep = Callable[[float], Awaitable[None]]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class CertificateClient(Protocol):
    """What the manager needs from a CA client (``agent.identity.ca_client.CaClient``)."""

    async def create_certificate(self, csr_pem: bytes, identity: SpiffeId | None,
                                 validity: dt.timedelta | None = None) -> list[bytes]: ...

    def set_trust_bundle(self, bundle: TrustBundle) -> None: ...


RENEWAL_BACKOFF = Backoff(initial=1.0, cap=150.0, jitter=0.2)  # after a failed fetch or renewal


class CertificateUnavailable(Exception):
    """No usable certificate for an identity right now (first fetch failed, expired, or forgotten)."""

    def __init__(self, identity: SpiffeId, reason: str) -> None:
        super().__init__(f"no certificate for {identity}: {reason}")
        self.identity = identity
        self.reason = reason


@dataclass(frozen=True)
class CertificateStatus:
    """One identity as ``ambit status`` shows it; never the key."""

    identity: SpiffeId
    state: str  # initializing | available | renewing (after failures) | unavailable | expired
    not_before: dt.datetime | None
    not_after: dt.datetime | None
    refresh_at: dt.datetime | None
    next_attempt: dt.datetime | None
    failures: int
    last_error: str | None

    def as_dict(self) -> dict[str, Any]:
        def iso(t: dt.datetime | None) -> str | None:
            return t.isoformat() if t else None

        return {"identity": str(self.identity), "state": self.state, "not_before": iso(self.not_before),
                "not_after": iso(self.not_after), "refresh_at": iso(self.refresh_at),
                "next_attempt": iso(self.next_attempt), "failures": self.failures,
                "last_error": self.last_error}


@dataclass(eq=False, slots=True)
class _Entry:
    identity: SpiffeId
    ready: asyncio.Future[WorkloadCertificate]
    task: asyncio.Task[None] | None = None  # the fetch in flight
    due: dt.datetime | None = None  # when the scheduler starts the next fetch (None while one runs)
    woken: bool = False  # fetch again as soon as the one in flight ends (a root dropped meanwhile)
    cert: WorkloadCertificate | None = None
    error: BaseException | None = None  # the first fetch failed and nothing succeeded since
    failures: int = 0
    last_error: str | None = None
    next_attempt: dt.datetime | None = None


class CertificateManager:
    """Workload certificates for the identities of the pods on this node."""

    def __init__(self, client: CertificateClient, trust_bundle: TrustBundle, *,
                 trust_bundle_file: Path | None = None, validity: dt.timedelta | None = None,
                 clock: Clock = _now, sleep: Sleep = asyncio.sleep, backoff: Backoff = RENEWAL_BACKOFF,
                 rand: Callable[[], float] = random.random, bundle_check_interval: float = 5.0,
                 worker: X509Worker | None = None) -> None:
        self._client = client
        self._worker = worker or X509Worker()
        self._rechecks: set[asyncio.Task[None]] = set()
        self._bundle = trust_bundle
        self._validity = validity
        self._clock = clock
        self._sleep = sleep
        self._backoff = backoff
        self._rand = rand
        self._entries: dict[SpiffeId, _Entry] = {}
        self._scheduler: asyncio.Task[None] | None = None
        self._kick = asyncio.Event()  # an identity's due time came forward (see _schedule)
        self._bundle_file = (WatchedFile(trust_bundle_file, self._parse_bundle, "trust bundle")
                             if trust_bundle_file is not None else None)
        self._bundle_check_interval = dt.timedelta(seconds=bundle_check_interval)
        self._bundle_checked: dt.datetime | None = None
        client.set_trust_bundle(trust_bundle)

    # --- trust bundle -------------------------------------------------------------------------------

    @property
    def trust_bundle(self) -> TrustBundle:
        """The roots to verify peers with. Re-reads the bundle file (if any) at most every few seconds."""
        now = self._clock()
        if self._bundle_file is not None and (self._bundle_checked is None
                                              or now - self._bundle_checked >= self._bundle_check_interval):
            self.reload_trust_bundle()
        return self._bundle

    def _parse_bundle(self, pem: bytes) -> TrustBundle:
        try:
            return TrustBundle(self._bundle.trust_domain, pem)
        except IdentityError as e:
            raise ValueError(str(e)) from None

    def reload_trust_bundle(self) -> bool:
        """Take the bundle file's roots (the whole bundle) if it changed; True when the bundle changed."""
        if self._bundle_file is None:
            return False
        self._bundle_checked = self._clock()
        try:
            bundle = self._bundle_file.get()
        except SourceError as e:
            log.error("keeping the current trust bundle: %s", e)
            return False
        return self._set_bundle(bundle)

    def update_trust_bundle(self, roots_pem: bytes, *, replace: bool = False) -> TrustBundle:
        """Trust the roots in ``roots_pem`` as well (or, with ``replace``, only those)."""
        bundle = (TrustBundle(self._bundle.trust_domain, roots_pem) if replace
                  else self._bundle.merged(roots_pem))
        self._set_bundle(bundle)
        return bundle

    def _set_bundle(self, bundle: TrustBundle) -> bool:
        if bundle == self._bundle:
            return False
        self._bundle = bundle
        self._client.set_trust_bundle(bundle)
        log.info("trust bundle for %r now holds %d root(s)", bundle.trust_domain, len(bundle.roots))
        if any(entry.cert is not None for entry in self._entries.values()):
            task = asyncio.get_running_loop().create_task(self._renew_unchained(bundle))
            self._rechecks.add(task)
            task.add_done_callback(self._rechecks.discard)
        return True

    async def _renew_unchained(self, bundle: TrustBundle) -> None:
        """Renew at once what no root of ``bundle`` signed (a dropped root's certificates)."""
        for entry in list(self._entries.values()):
            if entry.cert is None or bundle != self._bundle:
                continue
            try:
                await self._worker.verify(entry.cert.chain_pem, bundle.roots_pem)
            except IdentityError as e:
                log.info("certificate of %s no longer chains to the trust bundle, renewing: %s", entry.identity, e)
                self._renew_now(entry)

    # --- certificates --------------------------------------------------------------------------------

    def at_hand(self, identity: SpiffeId) -> WorkloadCertificate | None:
        """The certificate for ``identity`` when one is held and valid: ``get`` without a coroutine, for the data
        path's usual case (None: ask ``get``)."""
        entry = self._entries.get(identity)
        cert = entry.cert if entry is not None else None
        return cert if cert is not None and self._clock() < cert.not_after else None

    async def get(self, identity: SpiffeId) -> WorkloadCertificate:
        """The current certificate for ``identity``, fetching it first if needed."""
        cert = self.at_hand(identity)
        if cert is not None:
            return cert
        entry = self._entries.get(identity)
        if entry is None:
            if identity.trust_domain != self._bundle.trust_domain:
                raise CertificateUnavailable(identity, f"outside trust domain {self._bundle.trust_domain!r}")
            entry = _Entry(identity, asyncio.get_running_loop().create_future())
            entry.ready.add_done_callback(_consume_exception)
            self._entries[identity] = entry
            if self._scheduler is None:
                self._scheduler = asyncio.create_task(self._schedule(), name="certificate renewals")
            self._start_fetch(entry)
        if entry.cert is not None:  # (not at hand: expired)
            raise CertificateUnavailable(identity, f"certificate expired at {entry.cert.not_after.isoformat()}"
                                                   f" and renewing failed: {entry.last_error}")
        if entry.error is not None:
            raise CertificateUnavailable(identity, entry.last_error or "fetch failed") from entry.error
        return await asyncio.shield(entry.ready)

    def forget(self, identity: SpiffeId) -> None:
        """Stop renewing ``identity`` and drop its certificate (its last pod left the node)."""
        entry = self._entries.pop(identity, None)
        if entry is None:
            return
        if entry.task is not None:
            entry.task.cancel()
        if not entry.ready.done():
            entry.ready.set_exception(CertificateUnavailable(identity, "forgotten"))
        log.info("forgot %s", identity)

    def identities(self) -> list[SpiffeId]:
        return sorted(self._entries)

    def status(self) -> list[CertificateStatus]:
        now = self._clock()
        out = []
        for identity in sorted(self._entries):
            e = self._entries[identity]
            c = e.cert
            if c is None:
                state = "unavailable" if e.error is not None else "initializing"
            elif now >= c.not_after:
                state = "expired"
            else:
                state = "renewing" if e.failures else "available"
            out.append(CertificateStatus(identity, state, c.not_before if c else None,
                                         c.not_after if c else None, c.refresh_at if c else None,
                                         e.next_attempt, e.failures, e.last_error))
        return out

    async def close(self) -> None:
        """Stop the scheduler and every fetch, and the x509 worker process."""
        tasks = [e.task for e in self._entries.values() if e.task is not None] + list(self._rechecks)
        if self._scheduler is not None:
            tasks.append(self._scheduler)
            self._scheduler.cancel()
            self._scheduler = None
        for identity in list(self._entries):
            self.forget(identity)
        for task in self._rechecks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._worker.close()

    # --- worker --------------------------------------------------------------------------------------

    async def _fetch(self, identity: SpiffeId) -> WorkloadCertificate:
        key_pem, csr_pem = await self._worker.csr(identity)
        chain = await self._client.create_certificate(csr_pem, identity, self._validity)
        if not chain:
            raise IdentityError("the CA returned no certificate")
        certs = [c for pem in chain for c in split_pem(pem)]
        # The CA sends its root last; the chain we present is the leaf and any intermediates.
        presented = b"".join(block for i, (block, der) in enumerate(certs) if i == 0 or not _self_signed(der))
        cert = WorkloadCertificate.from_pem(presented, key_pem)
        if cert.identity != identity:
            raise IdentityError(f"the CA issued a certificate for {cert.identity}, not {identity}")
        if cert.not_after <= self._clock():
            raise IdentityError(f"the CA issued a certificate that expired at {cert.not_after.isoformat()}")
        try:
            await self._worker.verify(presented, self._bundle.roots_pem)
        except IdentityError:
            if not self.reload_trust_bundle():  # a new root may have been published meanwhile
                raise
            await self._worker.verify(presented, self._bundle.roots_pem)
        return cert

    def _start_fetch(self, entry: _Entry) -> None:
        entry.due, entry.woken = None, False
        entry.task = asyncio.create_task(self._refresh(entry), name=f"cert {entry.identity}")

    def _renew_now(self, entry: _Entry) -> None:
        """Fetch ``entry``'s certificate again at once (after the fetch in flight, if one is)."""
        if entry.task is not None:
            entry.woken = True
        elif self._entries.get(entry.identity) is entry:
            entry.due = self._clock()
            self._kick.set()

    async def _refresh(self, entry: _Entry) -> None:
        """One fetch of ``entry``'s certificate; then set when the next is due and tell the scheduler."""
        identity = entry.identity
        try:
            cert = await self._fetch(identity)
        except Exception as e:
            entry.failures += 1
            entry.last_error = f"{type(e).__name__}: {e}"
            delay = self._backoff.delay(entry.failures, self._rand())
            entry.next_attempt = self._clock() + dt.timedelta(seconds=delay)
            in_use = "keeping the current certificate" if entry.cert else "no certificate yet"
            log.warning("fetching a certificate for %s failed (%d in a row, %s), retrying in %.1fs: %s",
                        identity, entry.failures, in_use, delay, entry.last_error)
            if entry.cert is None:
                entry.error = e
                if not entry.ready.done():
                    entry.ready.set_exception(CertificateUnavailable(identity, entry.last_error))
        else:
            entry.cert, entry.error, entry.failures, entry.last_error = cert, None, 0, None
            entry.next_attempt = cert.refresh_at
            if not entry.ready.done():
                entry.ready.set_result(cert)
            log.info("certificate for %s valid until %s, renewing at %s", identity,
                     cert.not_after.isoformat(), cert.refresh_at.isoformat())
        entry.task = None
        entry.due = self._clock() if entry.woken else entry.next_attempt
        self._kick.set()

    async def _schedule(self) -> None:
        """Start each identity's fetch when it is due, sleeping (with the injected sleep) until the earliest due
        time or until ``_kick`` says that one came forward."""
        while True:
            self._kick.clear()
            now = self._clock()
            earliest: dt.datetime | None = None
            for entry in list(self._entries.values()):
                if entry.due is None:
                    continue
                if entry.due <= now:
                    self._start_fetch(entry)
                elif earliest is None or entry.due < earliest:
                    earliest = entry.due
            if earliest is None:
                await self._kick.wait()
            else:
                await self._pause((earliest - now).total_seconds())

    async def _pause(self, seconds: float) -> None:
        """Sleep ``seconds``, or less if ``_kick`` is or gets set."""
        sleeper = asyncio.ensure_future(self._sleep(seconds))
        waker = asyncio.ensure_future(self._kick.wait())
        try:
            await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (sleeper, waker):
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t


def _self_signed(der: bytes) -> bool:
    fields = CertificateFields.parse(der)
    return fields.issuer == fields.subject


def _consume_exception(fut: asyncio.Future[WorkloadCertificate]) -> None:
    """Mark a failed first fetch as seen: nobody may have been waiting for it."""
    if not fut.cancelled():
        fut.exception()
