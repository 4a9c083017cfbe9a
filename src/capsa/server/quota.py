"""How many sandboxes the server may hold: the global cap (``--max-sandboxes``, by default derived
from the machine) and each tenant's cap and create rate.

A slot is checked and taken in one synchronous step (:meth:`Quota.reserve`, no ``await`` in
between, so concurrent creates cannot all pass the check before any of them counts), held by the
sandbox until it is removed, and given back by :meth:`Quota.release` exactly once: by the create
that failed, or by the removal of the sandbox that held it.

A paused sandbox has no VM: it gives its running slot back (:meth:`Quota.park`), as E2B does not
count paused sandboxes against the concurrency limit, and takes a paused slot instead, of which
there are as many as running ones (its snapshot takes disk, so these are bounded too). A resume
takes a running slot again (:meth:`Quota.unpark`), or is refused when all are taken. A tenant's own
cap counts its paused sandboxes too."""

from __future__ import annotations

import logging
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from capsa.errors import CapsaError

log = logging.getLogger(__name__)

VM_OVERHEAD_MB = 160  # per sandbox on the host beyond its guest memory: QEMU (TCG code cache), gateway
SANDBOXES_PER_CORE = 8  # sandboxes mostly idle between commands; a boot takes a core for seconds
_MEMORY_SHARE = 0.8  # of MemAvailable at start: the rest stays for the server and the host
_WINDOW = 60.0  # seconds: creates_per_minute counts the creates of the last minute


@dataclass(frozen=True)
class TenantLimits:
    """A tenant's own limits (beside the server's global cap); None means no limit."""

    max_sandboxes: int | None = None
    creates_per_minute: int | None = None


class LimitReached(CapsaError):
    """A create would exceed a cap or a create rate (the server answers HTTP 429)."""


class Quota:
    """The slots of one server: ``max_sandboxes`` in all, and ``limits`` per tenant."""

    def __init__(
        self,
        max_sandboxes: int | None,
        limits: Mapping[str, TenantLimits] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_sandboxes = max_sandboxes
        self._limits = dict(limits or {})
        self._clock = clock
        self._total = 0
        self._paused = 0  # slots of paused sandboxes (held by their tenant, not in _total)
        self._held: Counter[str] = Counter()
        self._creates: dict[str, deque[float]] = {}

    def held(self, tenant: str | None = None) -> int:
        """Slots held in all (``tenant`` None) or by one tenant."""
        return self._total if tenant is None else self._held[tenant]

    def limits(self, tenant: str) -> TenantLimits:
        return self._limits.get(tenant, TenantLimits())

    def reserve(self, tenant: str) -> None:
        """Take a slot for a new sandbox of ``tenant``, or raise :class:`LimitReached` naming
        the limit. Synchronous on purpose: the check and the taking are one step."""
        limits = self.limits(tenant)
        if limits.max_sandboxes is not None and self._held[tenant] >= limits.max_sandboxes:
            raise LimitReached(
                f"tenant {tenant!r} may hold at most {limits.max_sandboxes} sandboxes "
                "(max_sandboxes in the API key file)",
                hint="kill one of this tenant's sandboxes or wait for one to time out",
            )
        now = self._clock()
        recent = self._creates.setdefault(tenant, deque())  # of a tenant with a create rate
        while recent and now - recent[0] >= _WINDOW:
            recent.popleft()
        if limits.creates_per_minute is not None and len(recent) >= limits.creates_per_minute:
            wait = _WINDOW - (now - recent[0])
            raise LimitReached(
                f"tenant {tenant!r} may create at most {limits.creates_per_minute} sandboxes per "
                f"minute (creates_per_minute in the API key file); retry in {wait:.0f} s",
                hint="create fewer sandboxes, or reuse one",
            )
        if self.max_sandboxes is not None and self._total >= self.max_sandboxes:
            raise LimitReached(
                f"this server runs at most {self.max_sandboxes} sandboxes (--max-sandboxes)",
                hint="kill a sandbox or wait for one to time out",
            )
        if limits.creates_per_minute is not None:
            recent.append(now)
        self._total += 1
        self._held[tenant] += 1

    def release(self, tenant: str, *, paused: bool = False) -> None:
        """Give back a slot of ``tenant`` (its create failed, or its sandbox was removed; a
        ``paused`` one gives back a paused slot)."""
        if self._held[tenant] <= 0:
            log.error("quota: tenant %r released a slot it did not hold", tenant)
            return
        self._held[tenant] -= 1
        if paused:
            self._paused -= 1
        else:
            self._total -= 1

    @property
    def paused(self) -> int:
        return self._paused

    def adopt_paused(self, tenant: str) -> None:
        """A paused sandbox kept by the state dir, loaded at start: a paused slot of ``tenant``
        whatever the limits (they bound what is created, not what a restart finds)."""
        self._held[tenant] += 1
        self._paused += 1

    def park(self, *, force: bool = False) -> None:
        """A sandbox is being paused: its running slot becomes a paused one. Raises
        :class:`LimitReached` when every paused slot is taken (not with ``force``: a resume that
        failed goes back to paused whatever the count)."""
        if not force and self.max_sandboxes is not None and self._paused >= self.max_sandboxes:
            raise LimitReached(
                f"this server keeps at most {self.max_sandboxes} paused sandboxes "
                "(as many as --max-sandboxes)",
                hint="kill or resume a paused sandbox first",
            )
        self._total -= 1
        self._paused += 1

    def unpark(self, *, force: bool = False) -> None:
        """A paused sandbox is being resumed: it takes a running slot again, or
        :class:`LimitReached` when all are taken (not with ``force``: a pause that failed
        keeps running)."""
        if not force and self.max_sandboxes is not None and self._total >= self.max_sandboxes:
            raise LimitReached(
                f"this server runs at most {self.max_sandboxes} sandboxes (--max-sandboxes): "
                "no room to resume a paused one",
                hint="kill or pause a running sandbox, or wait for one to time out",
            )
        self._paused -= 1
        self._total += 1


def machine_max_sandboxes(
    memory_mb: int, pooled: int = 0, *, available_mb: int | None = None, cores: int | None = None
) -> tuple[int, str]:
    """The default ``--max-sandboxes`` for this machine, and how it was derived (for the log):
    what fits in ``_MEMORY_SHARE`` of the memory available now (guest memory plus
    ``VM_OVERHEAD_MB`` each, less the ``pooled`` sandboxes kept warm), and at most
    ``SANDBOXES_PER_CORE`` per core; at least 1."""
    if available_mb is None:
        available_mb = _mem_available_mb()
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    by_memory = int(available_mb * _MEMORY_SHARE) // (memory_mb + VM_OVERHEAD_MB) - pooled
    by_cores = cores * SANDBOXES_PER_CORE
    chosen = max(1, min(by_memory, by_cores))
    why = (
        f"{by_memory} fit in {_MEMORY_SHARE:.0%} of {available_mb} MiB available at "
        f"{memory_mb}+{VM_OVERHEAD_MB} MiB each after {pooled} pooled; {by_cores} for {cores} cores"
    )
    return chosen, why


def _mem_available_mb(meminfo: Path = Path("/proc/meminfo")) -> int:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    pages, size = os.sysconf("SC_AVPHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    return int(pages * size) // (1 << 20)
