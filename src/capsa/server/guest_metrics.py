"""Per-sandbox resource samples (``Sandbox.get_metrics()``): CPU, memory and disk as the guest
sees them, taken every few seconds and kept, bounded, for the sandbox's life.

Why from the guest: the host sees one QEMU process, not what the guest's kernel counts as used,
cached or free. Why these reads: ``/proc/stat`` and ``/proc/meminfo`` come through the agent's
``read_file``, the root filesystem's size through its ``statvfs`` (no process is spawned in the
guest: under TCG a spawn translates a loader and a libc start, ~11 MiB of host memory per sandbox),
refreshed every ``DISK_EVERY`` samples and reused in between. Paused sandboxes are skipped (their
VM is gone) and keep their series; a removed sandbox's series goes with it.

Why a quiet guest is not asked: each sample wakes the guest and runs its agent (~3 ms of host CPU
under TCG per sandbox every 5 s: 0.3 cores per 100 idle sandboxes, more than the sandboxes' own
idling). A guest's numbers cannot change unless it runs, and the host sees whether it ran: when its
QEMU used less than :data:`QUIET_SHARE` of a core since the last sample, the previous sample
is repeated with the CPU share the host measured (``quiet``), at most :data:`FULL_EVERY` times in a
row. A request through the agent (a command, a file write) costs more than that, so anything that
can change memory or disk gets a real sample at the next tick."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from capsa._tasks import TaskSet
from capsa.errors import AgentError

if TYPE_CHECKING:
    from capsa.server.entry import Entry
    from capsa.server.registry import Registry

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 5.0  # seconds between two samples of a sandbox
KEEP_SECONDS = 3600  # how far back a sandbox's series goes
MAX_SAMPLES = 3600  # per sandbox, whatever the interval
DISK_EVERY = 12  # statvfs the root every this many samples
CONCURRENCY = 4  # sandboxes sampled at once
SAMPLE_TIMEOUT = 10.0
MAX_BATCH = 100  # sandbox ids in one batch request, as E2B
QUIET_SHARE = 0.004  # of one core: a guest whose QEMU used less since the last sample is quiet
FULL_EVERY = 12  # a real sample at least every this many, however quiet the guest
_TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Sample:
    timestamp: float  # unix seconds
    cpu_count: int
    cpu_used_pct: float
    mem_total: int
    mem_used: int
    mem_cache: int
    disk_total: int
    disk_used: int

    def to_json(self) -> dict[str, Any]:
        """The E2B API's ``SandboxMetric``."""
        stamp = datetime.datetime.fromtimestamp(self.timestamp, datetime.UTC)
        return {
            "timestamp": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "timestampUnix": int(self.timestamp),
            "cpuCount": self.cpu_count,
            "cpuUsedPct": round(self.cpu_used_pct, 2),
            "memTotal": self.mem_total,
            "memUsed": self.mem_used,
            "memCache": self.mem_cache,
            "diskTotal": self.disk_total,
            "diskUsed": self.disk_used,
        }


def cpu_times(stat: str) -> tuple[int, int, int]:
    """(cpus, busy jiffies, total jiffies) from ``/proc/stat``."""
    cpus, busy, total = 0, 0, 0
    for line in stat.splitlines():
        name, _, rest = line.partition(" ")
        if name == "cpu":
            values = [int(v) for v in rest.split()[:8]]
            total = sum(values)
            idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
            busy = total - idle
        elif name.startswith("cpu") and name[3:].isdigit():
            cpus += 1
    return max(cpus, 1), busy, total


def memory(meminfo: str) -> tuple[int, int, int]:
    """(total, used, page cache) bytes from ``/proc/meminfo``: used is what is not available."""
    fields: dict[str, int] = {}
    for line in meminfo.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            fields[name] = int(parts[0]) * 1024
    total = fields.get("MemTotal", 0)
    available = fields.get("MemAvailable", fields.get("MemFree", 0))
    return total, max(total - available, 0), fields.get("Cached", 0)


class _State:
    """What a sandbox's next sample builds on."""

    def __init__(self, keep: int) -> None:
        self.samples: deque[Sample] = deque(maxlen=keep)
        self.cpu: tuple[int, int] | None = None  # busy, total jiffies at the last sample
        self.disk: tuple[int, int] = (0, 0)
        self.taken = 0
        self.busy = False  # a sample is under way (a slow guest does not pile them up)
        self.host_cpu: float | None = None  # its QEMU's CPU seconds when the last sample ended
        self.quiet = 0  # samples repeated in a row since the last real one


class Sampler:
    """Samples every running sandbox of ``registry`` each ``interval`` seconds (0: never) and
    hands each sample to ``publish(sandbox_id, sample)`` (the Prometheus gauges)."""

    def __init__(
        self,
        registry: Registry,
        interval: float = DEFAULT_INTERVAL,
        publish: Callable[[str, Sample | None], None] | None = None,
    ) -> None:
        self._registry = registry
        self.interval = interval
        self._keep = min(MAX_SAMPLES, max(1, math.ceil(KEEP_SECONDS / interval))) if interval else 1
        self._publish = publish
        self._states: dict[str, _State] = {}
        self._tasks = TaskSet(log)
        self._gate = asyncio.Semaphore(CONCURRENCY)
        self.quiet_samples = 0  # samples repeated for quiet guests instead of asking them

    def start(self) -> None:
        if self.interval > 0:
            self._tasks.spawn(self._loop(), name="capsa-server-guest-metrics")

    async def close(self) -> None:
        self._tasks.cancel()
        await self._tasks.wait_all(5)

    def series(self, sandbox_id: str, start: int | None = None, end: int | None = None) -> list[Sample]:
        """The samples from ``start`` to ``end`` (unix seconds, inclusive, compared with each
        sample's whole second as the API gives it), oldest first."""
        state = self._states.get(sandbox_id)
        if state is None:
            return []
        return [
            s
            for s in state.samples
            if (start is None or int(s.timestamp) >= start) and (end is None or int(s.timestamp) <= end)
        ]

    def latest(self, sandbox_id: str) -> Sample | None:
        state = self._states.get(sandbox_id)
        return state.samples[-1] if state is not None and state.samples else None

    async def _loop(self) -> None:
        while True:
            started = time.monotonic()
            self.sweep()
            await asyncio.sleep(max(self.interval - (time.monotonic() - started), 0.05))

    def sweep(self) -> None:
        """Start a sample of each running sandbox not being sampled; forget removed ones."""
        entries = {e.id: e for e in self._registry.list()}
        for gone in set(self._states) - set(entries):
            del self._states[gone]
            if self._publish is not None:
                self._publish(gone, None)
        for entry in entries.values():
            if not entry.running:
                continue  # paused: its VM is gone, its series stays
            state = self._states.setdefault(entry.id, _State(self._keep))
            if not state.busy and self._repeat_if_quiet(entry, state):
                continue
            if not state.busy:
                state.busy = True
                self._tasks.spawn(self._sample(entry, state), name=f"capsa-server-sample-{entry.id}")

    def _repeat_if_quiet(self, entry: Entry, state: _State) -> bool:
        """Repeat the last sample if the guest has not run since (see the module's docstring)."""
        if not state.samples or state.host_cpu is None or state.quiet + 1 >= FULL_EVERY:
            return False
        now, at = host_cpu_seconds(entry), time.time()
        last = state.samples[-1]
        wall = max(at - last.timestamp, 1e-3)
        if now is None or now - state.host_cpu >= QUIET_SHARE * wall:
            return False
        pct = 100.0 * (now - state.host_cpu) / (wall * last.cpu_count)
        sample = dataclasses.replace(last, timestamp=at, cpu_used_pct=min(pct, 100.0))
        state.host_cpu = now
        state.quiet += 1
        self.quiet_samples += 1
        self._add(entry, state, sample)
        return True

    def _add(self, entry: Entry, state: _State, sample: Sample) -> None:
        state.samples.append(sample)
        if self._publish is not None:
            self._publish(entry.id, sample)

    async def _sample(self, entry: Entry, state: _State) -> None:
        try:
            # resume_lock: a pause, fork or snapshot (which hold it) needs an idle agent, and a
            # sample in flight would make it fail ("the agent is busy"): they take turns
            async with self._gate, asyncio.timeout(SAMPLE_TIMEOUT), entry.resume_lock:
                if not entry.running:
                    return
                sample = await self._take(entry, state)
        except Exception as exc:  # the sandbox went away, or its guest is too busy to answer
            log.debug("sampling sandbox %s failed: %r", entry.id, exc)
            return
        finally:
            state.busy = False
        if self._states.get(entry.id) is not state or not entry.running:
            return  # removed (or being removed) meanwhile: its gauges must not come back
        state.host_cpu, state.quiet = host_cpu_seconds(entry), 0
        self._add(entry, state, sample)

    async def _take(self, entry: Entry, state: _State) -> Sample:
        agent: Any = entry.vm.agent
        stat = (await agent.read_file("/proc/stat", limit=1 << 20)).decode("ascii", "replace")
        meminfo = (await agent.read_file("/proc/meminfo", limit=1 << 20)).decode("ascii", "replace")
        if state.taken % DISK_EVERY == 0:
            state.disk = await _disk(agent)
        state.taken += 1
        cpus, busy, total = cpu_times(stat)
        before = state.cpu or (0, 0)  # the first sample: the average since the guest booted
        state.cpu = (busy, total)
        spent = total - before[1]
        pct = 100.0 * (busy - before[0]) / spent if spent > 0 else 0.0
        mem_total, mem_used, mem_cache = memory(meminfo)
        return Sample(
            timestamp=time.time(),
            cpu_count=cpus,
            cpu_used_pct=min(max(pct, 0.0), 100.0),
            mem_total=mem_total,
            mem_used=mem_used,
            mem_cache=mem_cache,
            disk_total=state.disk[0],
            disk_used=state.disk[1],
        )


def host_cpu_seconds(entry: Entry) -> float | None:
    """The CPU time the sandbox's QEMU has used (None: not a local QEMU, or gone)."""
    pid = getattr(entry.vm, "pid", None)
    if not isinstance(pid, int):
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rpartition(b")")[2].split()
    except OSError:
        return None
    if len(fields) < 13:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime (fields 14, 15)


async def _disk(agent: Any) -> tuple[int, int]:
    """(total, used) bytes of the guest's root filesystem, from the agent's ``statvfs``; a guest
    agent older than it runs ``stat -f`` instead; (0, 0) if that is missing too."""
    try:
        usage = await agent.disk_usage("/", timeout=5)
    except AgentError as exc:
        if exc.kind != "bad_request":  # not an agent without the operation
            raise
    else:
        return usage.total, usage.used
    with contextlib.suppress(ValueError):
        result = await agent.exec("stat").args(["-f", "-c", "%S %b %f", "/"]).timeout(5).run()
        if result.ok:
            size, blocks, free = (int(v) for v in result.stdout.split()[:3])
            return size * blocks, size * (blocks - free)
    return 0, 0
