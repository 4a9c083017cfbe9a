"""``capsa.pool(builder, size)``: sandboxes kept booted in the background, handed out at once.

Each reserved sandbox is used by one caller and destroyed when released (never recycled: a sandbox
that ran untrusted code is not trusted again); the pool builds a replacement in the background. With
the template cache a replacement is a snapshot restore, so refilling is cheap. A build that fails is
recorded in ``last_error`` and retried with back-off: the pool keeps serving what it has.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator

from capsa.errors import CapsaError, CapsaTimeoutError, ConfigError, VMNotRunning
from capsa.sandbox.builder import SandboxBuilder
from capsa.sandbox.handle import Sandbox
from capsa.vm.runstate import RunState

log = logging.getLogger(__name__)

MAX_POOL = 64
_BACKOFF_MAX = 30.0


class Pool:
    """Create it with ``await capsa.pool(builder, size=4)``; close it with ``await pool.close()``."""

    def __init__(self, builder: SandboxBuilder, size: int) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_POOL:
            raise ConfigError(f"pool size must be an integer from 1 to {MAX_POOL}, got {size!r}")
        self._builder = builder
        self.size = size
        self._ready: deque[Sandbox] = deque()
        self._changed = asyncio.Event()
        self._wake_filler = asyncio.Event()
        self._closed = False
        self.last_error: CapsaError | None = None
        self._reapers: set[asyncio.Task[None]] = set()
        self._filler = asyncio.ensure_future(self._fill())

    @property
    def available(self) -> int:
        """Sandboxes booted and waiting."""
        return sum(1 for vm in self._ready if vm.status is RunState.RUNNING)

    async def _fill(self) -> None:
        backoff = 1.0
        while not self._closed:
            if len(self._ready) >= self.size:
                self._wake_filler.clear()
                await self._wake_filler.wait()
                continue
            try:
                vm = await self._builder.build()
            except CapsaError as exc:
                self.last_error = exc
                log.warning(
                    "pool: building a sandbox failed (retrying in %.0fs): %s", backoff, exc.message
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)
                continue
            backoff = 1.0
            if self._closed:
                await vm.kill()
                return
            self._ready.append(vm)
            self._changed.set()

    def try_reserve(self) -> Sandbox | None:
        """A ready sandbox now, or ``None``. The caller owns it (``await vm.stop()`` when done)."""
        self._check_open()
        while self._ready:
            vm = self._ready.popleft()
            self._wake_filler.set()
            if vm.status is RunState.RUNNING:
                return vm
            reaper = asyncio.ensure_future(vm.kill())  # died while waiting: clean it up
            self._reapers.add(reaper)
            reaper.add_done_callback(self._reapers.discard)
        return None

    async def take(self, timeout: float = 30.0) -> Sandbox:
        """Wait up to ``timeout`` seconds for a ready sandbox; the caller owns it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            vm = self.try_reserve()
            if vm is not None:
                return vm
            remaining = deadline - loop.time()
            if remaining <= 0:
                why = f"; last build error: {self.last_error.message}" if self.last_error else ""
                raise CapsaTimeoutError(f"no pooled sandbox became ready within {timeout}s{why}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    @contextlib.asynccontextmanager
    async def reserve(self, timeout: float = 30.0) -> AsyncIterator[Sandbox]:
        """``async with pool.reserve() as vm:`` — the sandbox is destroyed on exit and replaced."""
        vm = await self.take(timeout)
        try:
            yield vm
        finally:
            await vm.kill()

    def _check_open(self) -> None:
        if self._closed:
            raise VMNotRunning("the pool is closed")

    async def close(self) -> None:
        """Stop refilling and destroy the sandboxes still waiting."""
        self._closed = True
        self._wake_filler.set()
        self._filler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._filler
        while self._ready:
            await self._ready.popleft().kill()
        if self._reapers:
            await asyncio.gather(*self._reapers, return_exceptions=True)

    async def __aenter__(self) -> Pool:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def pool(builder: SandboxBuilder, size: int = 4) -> Pool:
    """A pool of ``size`` sandboxes built from ``builder``, filled in the background."""
    return Pool(builder, size)
