"""``capsa.pool(builder, size)``: sandboxes kept booted in the background, handed out at once.

Each reserved sandbox is used by one caller and destroyed when released (never recycled: a sandbox
that ran untrusted code is not trusted again); the pool builds a replacement in the background. With
the template cache a replacement is a snapshot restore, so refilling is cheap. A build that fails is
recorded in ``last_error`` (any exception, logged; ``take()`` names it when it times out) and retried
with back-off: the pool keeps serving what it has. A builder's ``lifetime`` starts when a sandbox is
handed out by ``take()``/``try_reserve()``, not while it waits in the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections import deque
from collections.abc import AsyncIterator

from capsa._tasks import TaskSet
from capsa.errors import CapsaError, CapsaTimeoutError, ConfigError, VMNotRunning
from capsa.sandbox.builder import SandboxBuilder
from capsa.sandbox.handle import Sandbox
from capsa.vm.runstate import RunState

log = logging.getLogger(__name__)

MAX_POOL = 64
_BACKOFF_MAX = 30.0
_CLOSE_TIMEOUT = 30.0


class PoolState(enum.Enum):
    """``OPEN`` (refilling in the background) ``→ CLOSED`` (nothing waits, nothing is taken)."""

    OPEN = "open"
    CLOSED = "closed"


class Pool:
    """Create it with ``await capsa.pool(builder, size=4)``; close it with ``await pool.close()``."""

    def __init__(self, builder: SandboxBuilder, size: int) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_POOL:
            raise ConfigError(f"pool size must be an integer from 1 to {MAX_POOL}, got {size!r}")
        if any(not mount.read_only for mount in builder.config.volumes):
            raise ConfigError(
                "a pool cannot hold sandboxes with a read-write volume (one mounter at a time)",
                hint="mount it read_only=True, or build such sandboxes one at a time",
            )
        self._builder = builder
        self.size = size
        self._ready: deque[Sandbox] = deque()
        self._changed = asyncio.Event()
        self._wake_filler = asyncio.Event()
        self._state = PoolState.OPEN
        self.last_error: BaseException | None = None
        self._lifetime = builder.config.lifetime  # starts at take(), not while waiting in the pool
        self._build_with = builder if self._lifetime is None else builder._with(lifetime=None)
        self._reapers = TaskSet(log)
        self._background = TaskSet(log, self._filler_died)
        self._filler = self._background.spawn(self._fill(), name="capsa-pool-filler")

    @property
    def waiting(self) -> tuple[Sandbox, ...]:
        """The sandboxes booted and waiting to be taken (a snapshot: taking one does not change it)."""
        return tuple(self._ready)

    @property
    def available(self) -> int:
        """Sandboxes booted and waiting."""
        return sum(1 for vm in self._ready if vm.status is RunState.RUNNING)

    def _filler_died(self, error: BaseException) -> None:
        """The refill task died (a bug: it retries every failure; the traceback is logged already):
        remember why, so that ``take()`` says it, and wake the callers waiting in ``take()``."""
        self.last_error = error
        self._changed.set()

    async def _fill(self) -> None:
        backoff = 1.0
        while self._is_open():
            if len(self._ready) >= self.size:
                self._wake_filler.clear()
                await self._wake_filler.wait()
                continue
            try:
                vm = await self._build_with.build()
            except Exception as exc:  # any failure: record it, back off, retry
                self.last_error = exc
                if isinstance(exc, CapsaError):
                    log.warning(
                        "pool: building a sandbox failed (retrying in %.0fs): %s", backoff, exc.message
                    )
                else:  # not one of ours: a bug or an environment failure; keep the traceback
                    log.error(
                        "pool: building a sandbox failed (retrying in %.0fs): %r",
                        backoff, exc, exc_info=exc,
                    )  # fmt: skip
                self._changed.set()  # wake take(): it reports the error if its time is up
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)
                continue
            backoff = 1.0
            if not self._is_open():  # closed while this one booted
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
                if self._lifetime is not None:
                    vm.set_lifetime(self._lifetime)
                return vm
            self._reapers.spawn(vm.kill(), name="capsa-pool-reaper")  # died while waiting: clean up
        return None

    async def take(self, timeout: float = 30.0) -> Sandbox:
        """Wait up to ``timeout`` seconds for a ready sandbox; the caller owns it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            vm = self.try_reserve()
            if vm is not None:
                return vm
            if self._filler.done():  # only a bug gets here: the filler retries every failure
                raise CapsaError(
                    f"the pool stopped refilling: {_describe(self.last_error or RuntimeError())}",
                    hint="see the logged traceback; close this pool and make a new one",
                )
            remaining = deadline - loop.time()
            if remaining <= 0:
                why = f"; last build error: {_describe(self.last_error)}" if self.last_error else ""
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

    def _is_open(self) -> bool:
        return self._state is PoolState.OPEN

    def _check_open(self) -> None:
        if not self._is_open():
            raise VMNotRunning("the pool is closed")

    async def close(self) -> None:
        """Stop refilling and destroy the sandboxes still waiting."""
        self._state = PoolState.CLOSED
        self._wake_filler.set()
        self._filler.cancel()
        await asyncio.gather(self._filler, return_exceptions=True)  # its failure is logged already
        while self._ready:
            vm = self._ready.popleft()
            try:
                await vm.kill()
            except Exception:  # destroy the others anyway
                log.exception("pool: destroying a waiting sandbox failed")
        await self._reapers.wait_all(_CLOSE_TIMEOUT)

    async def __aenter__(self) -> Pool:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def _describe(error: BaseException) -> str:
    return error.message if isinstance(error, CapsaError) else f"{type(error).__name__}: {error}"


async def pool(builder: SandboxBuilder, size: int = 4) -> Pool:
    """A pool of ``size`` sandboxes built from ``builder``, filled in the background."""
    return Pool(builder, size)
