"""The parsing and windowing of ``capsa serve``'s guest samples (no guest: /proc texts as a
Linux guest writes them)."""

from __future__ import annotations

import asyncio
import subprocess

from capsa.agent.types import DiskUsage
from capsa.errors import AgentError
from capsa.server.guest_metrics import FULL_EVERY, Sample, Sampler, cpu_times, memory

STAT = """cpu  100 0 50 800 50 0 0 0 0 0
cpu0 60 0 30 400 25 0 0 0 0 0
cpu1 40 0 20 400 25 0 0 0 0 0
intr 12345 0 0
ctxt 999
"""

MEMINFO = """MemTotal:         248272 kB
MemFree:          213512 kB
MemAvailable:     221788 kB
Buffers:               0 kB
Cached:            13924 kB
"""


def test_cpu_times_count_cpus_and_busy_jiffies() -> None:
    cpus, busy, total = cpu_times(STAT)
    assert cpus == 2
    assert total == 1000
    assert busy == 150  # idle and iowait are not busy


def test_memory_used_is_what_is_not_available() -> None:
    total, used, cache = memory(MEMINFO)
    assert total == 248272 * 1024
    assert used == (248272 - 221788) * 1024
    assert cache == 13924 * 1024


def test_sample_json_is_what_the_sdk_parses() -> None:
    sample = Sample(1796562391.561, 1, 12.345, 10, 5, 2, 100, 40)
    data = sample.to_json()
    assert data["timestamp"] == "2026-12-06T13:06:31.561Z"
    assert data["timestampUnix"] == 1796562391
    assert data["cpuUsedPct"] == 12.35
    assert set(data) == {
        *("timestamp", "timestampUnix", "cpuCount", "cpuUsedPct"),
        *("memTotal", "memUsed", "memCache", "diskTotal", "diskUsed"),
    }


class _Result:
    ok = True
    stdout = "4096 1000 250\n"  # stat -f -c "%S %b %f" /


class _Command:
    def args(self, argv: list[str]) -> _Command:
        assert argv == ["-f", "-c", "%S %b %f", "/"]
        return self

    def timeout(self, seconds: float) -> _Command:
        return self

    async def run(self) -> _Result:
        return _Result()


class _Agent:
    """/proc as a guest would serve it, its CPU counters moving between reads. ``statvfs``: whether
    it answers ``disk_usage`` (an older agent does not: the sampler runs ``stat -f``)."""

    def __init__(self, statvfs: bool = True) -> None:
        self.reads = 0
        self.statvfs = statvfs
        self.spawned = 0

    async def disk_usage(self, path: str, *, timeout: float) -> DiskUsage:
        if not self.statvfs:
            raise AgentError("disk_usage: unknown operation 'disk_usage'", kind="bad_request")
        return DiskUsage(path, 4096 * 1000, 4096 * 750)

    async def read_file(self, path: str, *, limit: int) -> bytes:
        if path == "/proc/meminfo":
            return MEMINFO.encode()
        self.reads += 1
        busy = 150 + 25 * (self.reads - 1)  # 25 of each 100 jiffies busy after the first read
        idle = 850 + 75 * (self.reads - 1)
        return f"cpu  {busy} 0 0 {idle} 0 0 0 0\ncpu0 1 0 0 1 0 0 0 0\n".encode()

    def exec(self, program: str) -> _Command:
        assert program == "stat"
        self.spawned += 1
        return _Command()


class _Vm:
    def __init__(self) -> None:
        self.agent = _Agent()


class _Entry:
    def __init__(self, sandbox_id: str) -> None:
        self.id = sandbox_id
        self.running = True
        self.vm = _Vm()
        self.resume_lock = asyncio.Lock()


class _Registry:
    def __init__(self, *entries: _Entry) -> None:
        self.entries = list(entries)

    def list(self) -> list[_Entry]:
        return self.entries


def test_sampler_keeps_a_bounded_series_and_forgets_removed_sandboxes() -> None:
    published: list[tuple[str, Sample | None]] = []

    async def scenario() -> None:
        entry = _Entry("s1")
        registry = _Registry(entry)
        sampler = Sampler(registry, interval=1200, publish=lambda i, s: published.append((i, s)))  # type: ignore[arg-type]
        for round_ in range(5):
            sampler.sweep()
            for _ in range(100):
                await asyncio.sleep(0)
                if len(sampler.series("s1")) > round_:
                    break
        samples = sampler.series("s1")
        assert len(samples) == 3  # one hour at 1200 s: the newest 3
        first, last = samples[0], samples[-1]
        assert last.cpu_count == 1
        assert last.cpu_used_pct == 25.0  # the busy share since the previous sample
        assert (last.disk_total, last.disk_used) == (4096 * 1000, 4096 * 750)
        assert last.mem_total == 248272 * 1024
        assert sampler.latest("s1") == last
        assert sampler.series("s1", start=int(first.timestamp) + 3600) == []
        assert sampler.series("s1", end=int(last.timestamp)) == samples
        entry.running = False  # paused: not sampled, its series kept
        sampler.sweep()
        assert sampler.series("s1") == samples
        registry.entries.clear()  # removed: its series and gauges go
        sampler.sweep()
        assert sampler.series("s1") == []
        assert published[-1] == ("s1", None)
        await sampler.close()

    asyncio.run(scenario())


def test_sampler_waits_while_a_pause_fork_or_snapshot_saves_the_guest() -> None:
    """A save holds the entry's resume_lock and needs an idle agent: a sample must not start
    an agent request meanwhile (the save would fail with "the agent is busy")."""

    async def scenario() -> None:
        entry = _Entry("s1")
        sampler = Sampler(_Registry(entry), interval=1200)  # type: ignore[arg-type]
        async with entry.resume_lock:  # a fork's snapshot under way
            sampler.sweep()
            for _ in range(50):
                await asyncio.sleep(0)
            assert sampler.series("s1") == []  # nothing read from the guest while it saves
        for _ in range(100):
            await asyncio.sleep(0)
            if sampler.series("s1"):
                break
        assert len(sampler.series("s1")) == 1  # sampled once the save is done
        await sampler.close()

    asyncio.run(scenario())


async def _sample_rounds(sampler: Sampler, entry: _Entry, rounds: int) -> None:
    """``rounds`` sweeps, each waiting for its sample to land."""
    for _ in range(rounds):
        before = len(sampler.series(entry.id))
        sampler.sweep()
        for _ in range(200):
            await asyncio.sleep(0)
            if len(sampler.series(entry.id)) > before:
                break
        assert len(sampler.series(entry.id)) == before + 1


def test_a_quiet_guest_is_not_asked_but_gets_a_real_sample_every_full_every() -> None:
    """Its QEMU (here a sleeping process) used no CPU since the last sample: the sample is
    repeated, with a CPU share of 0, without a request to the guest; every FULL_EVERY-th is real."""

    async def scenario(pid: int) -> None:
        entry = _Entry("s1")
        entry.vm.pid = pid  # type: ignore[attr-defined]
        agent = entry.vm.agent
        sampler = Sampler(_Registry(entry), interval=60)  # type: ignore[arg-type]
        await _sample_rounds(sampler, entry, 1)
        assert agent.reads == 1
        await _sample_rounds(sampler, entry, FULL_EVERY - 1)
        assert agent.reads == 1  # nothing asked of the guest
        samples = sampler.series("s1")
        assert [s.cpu_used_pct for s in samples[1:]] == [0.0] * (FULL_EVERY - 1)
        assert {(s.mem_used, s.disk_used) for s in samples} == {
            (samples[0].mem_used, samples[0].disk_used)
        }
        assert sampler.quiet_samples == FULL_EVERY - 1
        await _sample_rounds(sampler, entry, 1)
        assert agent.reads == 2  # the FULL_EVERY-th: a real one however quiet
        await sampler.close()

    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        asyncio.run(scenario(sleeper.pid))
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_guest_whose_qemu_ran_is_sampled_for_real() -> None:
    async def scenario(pid: int) -> None:
        entry = _Entry("s1")
        entry.vm.pid = pid  # type: ignore[attr-defined]
        sampler = Sampler(_Registry(entry), interval=60)  # type: ignore[arg-type]
        for round_ in range(3):
            await asyncio.sleep(0.3)  # the "QEMU" burns CPU meanwhile
            await _sample_rounds(sampler, entry, 1)
            assert entry.vm.agent.reads == round_ + 1
        assert sampler.quiet_samples == 0
        await sampler.close()

    burner = subprocess.Popen(["sh", "-c", "while :; do :; done"])
    try:
        asyncio.run(scenario(burner.pid))
    finally:
        burner.kill()
        burner.wait()


def test_the_disk_comes_from_the_agents_statvfs_and_from_stat_f_with_an_older_agent() -> None:
    async def scenario(statvfs: bool) -> tuple[Sample, int]:
        entry = _Entry("s1")
        entry.vm.agent = _Agent(statvfs)
        sampler = Sampler(_Registry(entry), interval=60)  # type: ignore[arg-type]
        await _sample_rounds(sampler, entry, 1)
        await sampler.close()
        return sampler.series("s1")[0], entry.vm.agent.spawned

    for statvfs, spawns in ((True, 0), (False, 1)):
        sample, spawned = asyncio.run(scenario(statvfs))
        assert (sample.disk_total, sample.disk_used) == (4096 * 1000, 4096 * 750)
        assert spawned == spawns  # no process in the guest unless the agent is too old
