"""Density (issue 28), scaled down: 20 idle sandboxes from the default template, each within its
host budget, and admission control refusing the VM too many before anything starts.

The bounds are the measured figures (bench/density.py, docs/performance.md §Density) with margins
for a loaded, shared machine: PSS 24-29 MiB measured, bound 40 (before this work: 28-30 idle, but up
to 1 GiB of translation cache once busy, which tb-size now caps); idle QEMU CPU 0.01-0.07 cores per
100 measured, bound 0.15 (before: 0.26-0.4, the PIT and the clocksource watchdog waking every VM).
"""

from __future__ import annotations

import asyncio
import os
import resource
import threading
import time
from pathlib import Path

import pytest

import capsa
from capsa.vm.admission import FDS_PER_VM

pytestmark = [pytest.mark.vm]

N = 20
TICK = os.sysconf("SC_CLK_TCK")


def _descendants(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            found += [int(child), *_descendants(int(child))]
    return found


def _pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    raise AssertionError(f"no Pss in smaps_rollup of {pid}")


def _cpu_ticks(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


def _qemus(root: int) -> list[int]:
    return [p for p in _descendants(root) if b"qemu-system" in Path(f"/proc/{p}/cmdline").read_bytes()]


@pytest.mark.asyncio
@pytest.mark.timeout(150)
async def test_twenty_idle_sandboxes_stay_within_their_host_budget() -> None:
    await (await capsa.sandbox().build()).kill()  # the template exists before anything is counted
    me = os.getpid()
    others = set(_qemus(me))  # a session-scoped server's pool (tests/ui) is not this test's
    fds0, threads0 = len(os.listdir("/proc/self/fd")), threading.active_count()
    tasks0 = len(asyncio.all_tasks())
    gate = asyncio.Semaphore(4)
    vms: list[capsa.Sandbox] = []

    async def one() -> None:
        async with gate:
            vms.append(await capsa.sandbox().build())

    try:
        started = time.monotonic()
        await asyncio.gather(*(one() for _ in range(N)))
        build_s = time.monotonic() - started
        await asyncio.sleep(3)  # the restores' last guest work settles
        pids = [p for p in _qemus(me) if p not in others]
        assert len(pids) == N
        before = sum(_cpu_ticks(p) for p in pids)
        await asyncio.sleep(8)
        idle_per_100 = (sum(_cpu_ticks(p) for p in pids) - before) / TICK / 8 / N * 100
        pss_mib = sum(_pss_kib(p) for p in pids) / N / 1024
        fds = (len(os.listdir("/proc/self/fd")) - fds0) / N
        threads = (threading.active_count() - threads0) / N
        tasks = (len(asyncio.all_tasks()) - tasks0) / N
        qemu_threads = max(len(os.listdir(f"/proc/{p}/task")) for p in pids)
        qemu_fds = max(len(os.listdir(f"/proc/{p}/fd")) for p in pids)
        pings = await asyncio.gather(*(vm.agent.ping(timeout=2.0) for vm in vms), return_exceptions=True)
        failed = [p for p in pings if isinstance(p, BaseException)]
        figures = (
            f"build {build_s:.1f} s, PSS {pss_mib:.1f} MiB, idle {idle_per_100:.3f} cores/100, host fds "
            f"{fds:.1f}, host threads {threads:.2f}, tasks {tasks:.1f}, QEMU threads {qemu_threads}, "
            f"QEMU fds {qemu_fds} (per sandbox)"
        )
        assert not failed, f"{len(failed)} sandboxes did not answer ping within 2 s: {failed[0]!r}"
        assert pss_mib <= 40, figures
        assert idle_per_100 <= 0.15, figures
        assert fds <= FDS_PER_VM, figures  # what admission control and doctor budget
        assert threads <= 0.25, figures  # none per QEMU: capsa waits on a pidfd, not a thread
        assert tasks <= 10, figures
        assert qemu_threads <= 8 and qemu_fds <= 24, figures
    finally:
        await asyncio.gather(*(vm.kill() for vm in vms), return_exceptions=True)
    await asyncio.sleep(0.5)  # the kills' own tasks finish
    assert len(os.listdir("/proc/self/fd")) <= fds0 + 2, "fds left behind by killed sandboxes"
    assert len(asyncio.all_tasks()) <= tasks0 + 2, "tasks left behind by killed sandboxes"


@pytest.mark.asyncio
async def test_more_sandboxes_than_memory_allows_is_refused_before_qemu_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    available = int(Path("/proc/meminfo").read_text().split("MemAvailable:")[1].split()[0]) // 1024
    monkeypatch.setenv("CAPSA_MIN_FREE_MB", str(available + 1024))  # as if memory were that short
    with pytest.raises(capsa.CapacityError) as caught:
        await capsa.sandbox().build()
    assert caught.value.resource == "memory" and caught.value.needed > caught.value.available
    assert "CAPSA_MIN_FREE_MB" in (caught.value.hint or "")
    monkeypatch.setenv("CAPSA_MIN_FREE_MB", "0")  # off: the same build goes through
    await (await capsa.sandbox().build()).kill()
    # no_leaks (conftest) checks no QEMU and no runtime dir were left by the refused build


@pytest.mark.asyncio
async def test_open_file_limit_too_low_is_a_clear_error_naming_it() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = len(os.listdir("/proc/self/fd")) + 20  # room for a few files, not for another VM
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    try:
        with pytest.raises(capsa.CapacityError) as caught:
            await capsa.sandbox().build()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert caught.value.resource == "open files" and caught.value.available == low
    assert "ulimit -n" in caught.value.message and "ulimit -n" in (caught.value.hint or "")
