"""The agent's side of ``agent.identity.x509ops``: one worker process, started when a key, a CSR or a chain check is
needed and ended after ``idle`` seconds without one, so that the long-lived agent never loads a crypto library.

Requests go one at a time (each takes about a millisecond; a node's start-up with 100 identities costs the worker's
own start, ~0.2 s, once). A worker that dies, hangs (``timeout``) or answers nonsense fails the request at hand with
IdentityError (the certificate manager retries with backoff), is killed, and the next request starts a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from typing import Any

from hbone.identity import IdentityError, SpiffeId

REPLY_LIMIT = 1 << 20  # bytes: a reply line (a key and a CSR are ~0.5 KiB)


class X509Worker:
    def __init__(self, idle: float = 2.0, timeout: float = 30.0) -> None:
        self.idle, self.timeout = idle, timeout
        self._proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()
        self._idle_timer: asyncio.TimerHandle | None = None
        self._ending: asyncio.Future[None] | None = None
        self.started = 0  # worker processes started so far

    async def csr(self, identity: SpiffeId) -> tuple[bytes, bytes]:
        """A new private key (PKCS#8 PEM) and a CSR for ``identity`` signed with it."""
        reply = await self._request({"op": "csr", "identity": str(identity)})
        return reply["key"].encode(), reply["csr"].encode()

    async def verify(self, chain_pem: bytes, roots_pem: bytes) -> None:
        """Raise IdentityError unless ``chain_pem`` is signed up to a root in ``roots_pem``."""
        await self._request({"op": "verify", "chain": chain_pem.decode(), "roots": roots_pem.decode()})

    async def _request(self, request: dict[str, Any]) -> dict[str, Any]:
        async with self._lock:
            if self._idle_timer is not None:
                self._idle_timer.cancel()
            try:
                proc = await self._running()
                assert proc.stdin is not None and proc.stdout is not None
                proc.stdin.write(json.dumps(request).encode() + b"\n")
                async with asyncio.timeout(self.timeout):
                    await proc.stdin.drain()
                    line = await proc.stdout.readline()
                if not line.endswith(b"\n"):
                    raise IdentityError(f"the x509 worker ended without answering (exit code {proc.returncode})")
                reply = json.loads(line)
                if not isinstance(reply, dict):
                    raise ValueError("not a JSON object")
            except (OSError, ValueError, TimeoutError) as e:
                await self._stop(kill=True)
                raise IdentityError(f"the x509 worker failed: {type(e).__name__}: {e}") from None
            except IdentityError:
                await self._stop(kill=True)
                raise
            finally:
                self._idle_timer = asyncio.get_running_loop().call_later(self.idle, self._end_if_idle)
        if "error" in reply:
            raise IdentityError(str(reply["error"]))
        return reply

    async def _running(self) -> asyncio.subprocess.Process:
        if self._proc is None or self._proc.returncode is not None:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "agent.identity.x509ops", stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, limit=REPLY_LIMIT)
            self.started += 1
        return self._proc

    def _end_if_idle(self) -> None:
        if not self._lock.locked():
            self._ending = asyncio.ensure_future(self._stop())

    async def _stop(self, kill: bool = False) -> None:
        """End the worker (its input closed, it exits; ``kill``: one that failed is killed) and reap it."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            if kill:
                raise TimeoutError
            async with asyncio.timeout(5):
                await proc.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def close(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        async with self._lock:
            await self._stop()
        if self._ending is not None:
            await self._ending
