"""Density: what an idle sandbox costs the host, and whether many busy ones all make progress.

For each N (``--counts``): build N sandboxes from the default template through the public API
(``--parallel`` builds at a time), then over an idle window measure

- host memory per sandbox: PSS (``/proc/<pid>/smaps_rollup``) of every process it started (QEMU and
  any virtiofsd below it) plus what this Python process grew by (its PSS before vs after);
- idle CPU per 100 sandboxes: CPU time (``/proc/<pid>/stat`` utime+stime) those processes and this
  Python process consumed over the window — not the machine's load, which other jobs share;
- build time per sandbox, and every sandbox answering ``ping`` within 2 s at the end;
- host resources per sandbox: this process's fds, threads and asyncio tasks, QEMU's threads and fds.

Then ``--busy`` sandboxes each run a short CPU burst every second for ``--busy-seconds``: the
slowest one's completed bursts against the median's (goal >= 0.5) and the ``ping`` p95 (< 1 s).
Every sandbox is killed at the end, also on Ctrl-C or an error.

With ``--ksm PAGES/MS[,PAGES/MS]`` (root only) KSM is turned on after the builds (``pages_to_scan``
PAGES, ``sleep_millisecs`` MS), the idle figures are taken once ksmd has completed two full scans, and
ksmd's own CPU over the window is reported (it counts against the idle budget) — at the second rate if
one is given (settle fast, then measure a steady rate); KSM's settings are put back as they were at
the end, also on an error. capsa marks QEMU's memory mergeable (``PR_SET_MEMORY_MERGE``).

    .venv/bin/python -m bench.density [--counts 100,250,500] [--busy 50] [--exec-once] [--ksm 1000/20]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import statistics
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import capsa
from bench._report import figure, header
from capsa.vm.admission import mem_available_mb

T = TypeVar("T")

TICK = os.sysconf("SC_CLK_TCK")
# A busy sandbox's loop: a CPU burst (~10-20 ms of QEMU CPU once translated), a line, a 1 s sleep;
# python, because a shell loop's ``sleep`` forks and execs every second (~35 ms under TCG).
BUSY_LOOP = (
    "import time\nwhile True:\n    sum(range(20000))\n    print('.', flush=True)\n    time.sleep(1)\n"
)


def children(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    found = [pid]
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                found += children(int(child))
    except OSError:
        pass
    return found


def sandbox_pids(host_pid: int) -> list[int]:
    """The processes the sandboxes started (QEMU, virtiofsd), not the per-process guardian."""
    found = []
    for pid in children(host_pid)[1:]:
        try:
            argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        if argv0.endswith((b"qemu-system-x86_64", b"virtiofsd")):
            found.append(pid)
    return found


def pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_ticks(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


KSM = Path("/sys/kernel/mm/ksm")
KSM_KNOBS = ("run", "pages_to_scan", "sleep_millisecs")


def ksm_read(name: str) -> int:
    return int((KSM / name).read_text().split()[0])


def ksm_rate(spec: str) -> None:
    pages, millis = spec.split("/")
    (KSM / "pages_to_scan").write_text(pages)
    (KSM / "sleep_millisecs").write_text(millis)


@contextlib.contextmanager
def ksm_on(spec: str) -> Iterator[None]:
    """KSM running with ``spec`` ("PAGES/MS") inside, the host's settings restored after."""
    saved = {name: (KSM / name).read_text().strip() for name in KSM_KNOBS}
    try:
        ksm_rate(spec)
        (KSM / "run").write_text("1")
        yield
    finally:
        with contextlib.suppress(OSError):
            if saved["run"] == "0":
                (KSM / "run").write_text("2")  # unmerge what was merged: the host as it was
        for name in reversed(KSM_KNOBS):
            with contextlib.suppress(OSError):
                (KSM / name).write_text(saved[name])


async def ksm_settled(timeout: float = 600) -> float:
    """Wait for two full scans after now; returns the seconds it took."""
    start, first = time.monotonic(), ksm_read("full_scans")
    # ksmd's counter in sysfs has no event to wait on: poll it
    while ksm_read("full_scans") < first + 2 and time.monotonic() - start < timeout:  # noqa: ASYNC110
        await asyncio.sleep(1)
    return time.monotonic() - start


def ksmd_pid() -> int:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == "ksmd":
                    return int(entry.name)
    return 0


def count(path: str) -> int:
    try:
        return len(os.listdir(path))
    except OSError:
        return 0


async def make_concurrently(
    n: int, parallel: int, make: Callable[[], Awaitable[T]], what: str
) -> tuple[list[T], float]:
    """``n`` calls of ``make``, ``parallel`` at a time: what they made (also when some failed: the
    caller kills those) and the seconds it took."""
    gate = asyncio.Semaphore(parallel)
    made: list[T] = []

    async def one() -> None:
        async with gate:
            made.append(await make())

    started = time.perf_counter()
    results = await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
    elapsed = time.perf_counter() - started
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:
        print(f"   {len(failures)} of {n} {what} failed; first: {failures[0]!r}", flush=True)
    return made, elapsed


async def build_all(n: int, parallel: int, exec_once: bool) -> tuple[list[capsa.Sandbox], float]:
    """Build ``n`` sandboxes; on any failure the ones built are returned too (the caller kills)."""

    async def one() -> capsa.Sandbox:
        vm = await capsa.sandbox().build()
        if exec_once:
            try:
                await vm.agent.exec("python3").args(["-c", "print(sum(range(10000)))"]).run()
            except BaseException:
                await vm.kill()
                raise
        return vm

    return await make_concurrently(n, parallel, one, "builds")


async def ping_all(vms: list[capsa.Sandbox], limit: float = 2.0, at_once: int = 0) -> tuple[int, float]:
    """Ping every sandbox (all at once, or ``at_once`` at a time) and count the answers within
    ``limit`` seconds each."""
    gate = asyncio.Semaphore(at_once or len(vms) or 1)

    async def one(vm: capsa.Sandbox) -> float | None:
        async with gate:
            return await timed(vm)

    async def timed(vm: capsa.Sandbox) -> float | None:
        start = time.perf_counter()
        try:
            await vm.agent.ping(timeout=limit)
        except (capsa.CapsaError, TimeoutError):
            return None
        return time.perf_counter() - start

    times = await asyncio.gather(*(one(vm) for vm in vms))
    answered = [t for t in times if t is not None and t <= limit]
    return len(answered), max(answered, default=0.0)


async def kill_all(vms: list[capsa.Sandbox]) -> None:
    gate = asyncio.Semaphore(16)

    async def one(vm: capsa.Sandbox) -> None:
        async with gate:
            with contextlib.suppress(capsa.CapsaError):
                await vm.kill()

    await asyncio.shield(asyncio.gather(*(one(vm) for vm in vms)))


async def idle_level(n: int, parallel: int, window: float, exec_once: bool, ksm: str = "") -> None:
    me = os.getpid()
    base_pss = pss_kib(me)
    base_fds, base_threads = count("/proc/self/fd"), threading.active_count()
    base_tasks = len(asyncio.all_tasks())
    vms: list[capsa.Sandbox] = []
    try:
        vms, elapsed = await build_all(n, parallel, exec_once)
        per_build = elapsed / max(1, len(vms))
        await asyncio.sleep(3)  # let the restores' last work settle
        pids = sandbox_pids(me)
        settle_rate, _, steady_rate = ksm.partition(",")
        with ksm_on(settle_rate) if ksm else contextlib.nullcontext():
            settle = await ksm_settled() if ksm else 0.0
            if steady_rate:
                ksm_rate(steady_rate)
            ksmd = ksmd_pid() if ksm else 0
            ksmd_ticks = cpu_ticks(ksmd) if ksmd else 0
            before = {p: cpu_ticks(p) for p in [*pids, me]}
            await asyncio.sleep(window)
            after = {p: cpu_ticks(p) for p in before}
            ksmd_ticks = cpu_ticks(ksmd) - ksmd_ticks if ksmd else 0
            pss_ksm = sum(pss_kib(p) for p in pids) + max(0, pss_kib(me) - base_pss)
            sharing = ksm_read("pages_sharing") if ksm else 0
        qemu_ticks = sum(after[p] - before[p] for p in pids)
        host_ticks = after[me] - before[me]
        pss = pss_ksm
        k = max(1, len(vms))
        answered, slowest = await ping_all(vms)
        answered16, slowest16 = await ping_all(vms, at_once=16)
        fds = (count("/proc/self/fd") - base_fds) / k
        threads = (threading.active_count() - base_threads) / k
        tasks = (len(asyncio.all_tasks()) - base_tasks) / k
        qemu_threads = statistics.median(count(f"/proc/{p}/task") for p in pids) if pids else 0
        qemu_fds = statistics.median(count(f"/proc/{p}/fd") for p in pids) if pids else 0
        pss_mib = pss / k / 1024
        idle = (qemu_ticks + host_ticks) / TICK / window / k * 100
        print(
            f"N={n:4d}: built {len(vms)} in {elapsed:.1f} s ({per_build * 1000:.0f} ms per sandbox, "
            f"{parallel} at a time); PSS {pss_mib:.1f} MiB per sandbox; idle CPU {idle:.3f} cores "
            f"per 100 (QEMU {qemu_ticks / TICK / window / k * 100:.3f}, host Python "
            f"{host_ticks / TICK / window / k * 100:.3f}; {window:.0f} s window); ping: {answered}/"
            f"{len(vms)} answered within 2 s (slowest {slowest * 1000:.0f} ms) all pinged at once, "
            f"{answered16}/{len(vms)} (slowest {slowest16 * 1000:.0f} ms) 16 at a time",
            flush=True,
        )
        print(
            f"        per sandbox: host fds {fds:.1f}, host threads {threads:.2f}, asyncio tasks "
            f"{tasks:.1f}; QEMU threads {qemu_threads:.0f}, QEMU fds {qemu_fds:.0f}",
            flush=True,
        )
        if ksm:
            print(
                f"        KSM {ksm} (pages_to_scan/sleep_millisecs): two full scans in {settle:.0f} s; "
                f"{sharing * 4 / 1024 / k:.1f} MiB per sandbox merged away (pages_sharing); ksmd "
                f"{ksmd_ticks / TICK / window:.3f} cores over the window at "
                f"{steady_rate or settle_rate}",
                flush=True,
            )
            figure(f"density_{n}_ksmd_cores", ksmd_ticks / TICK / window, "cores")
        figure(f"density_{n}_pss_mib_per_sandbox", pss_mib, "MiB", "<= 15")
        figure(f"density_{n}_idle_cores_per_100", idle, "cores", "<= 0.05")
        figure(f"density_{n}_build_ms_per_sandbox", per_build * 1000, "ms")
        figure(f"density_{n}_answered_fraction", answered / n, "fraction", ">= 1")
        figure(f"density_{n}_host_fds_per_sandbox", fds, "fds")
        figure(f"density_{n}_tasks_per_sandbox", tasks, "tasks")
    finally:
        await kill_all(vms)


async def busy_level(n: int, parallel: int, seconds: float) -> None:
    """Each sandbox runs one guest loop: a CPU burst, a line of output, a 1 s sleep. Progress is the
    lines each one printed over the window (an exec per burst would mostly measure exec: ~35 ms of
    QEMU CPU each, more than 50 bursts a second leave of two cores)."""
    vms: list[capsa.Sandbox] = []
    processes: list[capsa.Process] = []
    try:
        vms, _ = await build_all(n, parallel, exec_once=False)
        arrivals: list[list[float]] = [[] for _ in vms]

        async def counter(index: int, process: capsa.Process) -> None:
            while await process.stdout.readline():
                arrivals[index].append(time.monotonic())

        for vm in vms:
            processes.append(await vm.agent.exec("python3").args(["-c", BUSY_LOOP]).spawn())
        counters = [asyncio.ensure_future(counter(i, p)) for i, p in enumerate(processes)]
        await asyncio.sleep(8)  # every loop started (python under TCG: ~1 s of CPU each)
        pings: list[float] = []
        pids = sandbox_pids(os.getpid())
        ticks = sum(cpu_ticks(p) for p in pids)
        window_start = time.monotonic()
        deadline = window_start + seconds

        async def pinger(vm: capsa.Sandbox) -> None:
            while time.monotonic() < deadline:
                started = time.perf_counter()
                await vm.agent.ping(timeout=10)
                pings.append(time.perf_counter() - started)
                await asyncio.sleep(0.5)

        try:
            await asyncio.gather(*(pinger(vm) for vm in vms))
        finally:
            for task in counters:
                task.cancel()
            await asyncio.gather(*counters, return_exceptions=True)
        done = [sum(window_start <= t < deadline for t in times) for times in arrivals]
        cores = (sum(cpu_ticks(p) for p in pids) - ticks) / TICK / seconds
        median = statistics.median(done)
        spread = min(done) / median if median else 0.0
        ordered = sorted(pings)
        p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))] if ordered else 0.0
        print(
            f"busy {len(vms)}: bursts per sandbox in {seconds:.0f} s (one a second scheduled): min "
            f"{min(done)}, median {median:.0f}, max {max(done)} (slowest/median {spread:.2f}, goal "
            f">= 0.5); ping p95 {p95 * 1000:.0f} ms over {len(pings)} pings (goal < 1000); QEMU used "
            f"{cores:.2f} cores, load average {os.getloadavg()[0]:.1f}",
            flush=True,
        )
        figure(f"density_busy{n}_slowest_vs_median", spread, "x", ">= 0.5")
        figure(f"density_busy{n}_ping_p95_ms", p95 * 1000, "ms", "< 1000")
    finally:
        await kill_all(vms)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--counts", default="100,250,500", help="numbers of idle sandboxes")
    parser.add_argument("--parallel", type=int, default=4, help="builds at a time")
    parser.add_argument("--window", type=float, default=20.0, help="idle window in seconds")
    parser.add_argument("--busy", type=int, default=50, help="busy sandboxes (0: skip)")
    parser.add_argument("--busy-seconds", type=float, default=20.0)
    parser.add_argument("--exec-once", action="store_true", help="run python3 once in each first")
    parser.add_argument("--ksm", default="", help="PAGES/MS: KSM on (root) for the idle figures")
    args = parser.parse_args()
    header("density")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:  # measure density, not this shell's ulimit -n (admission control names it)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    print(
        f"# ulimit -n {hard}; memory available {mem_available_mb()} MiB",
        flush=True,
    )
    await (await capsa.sandbox().build()).kill()  # the template exists before any timing
    for n in [int(c) for c in args.counts.split(",") if c]:
        await idle_level(n, args.parallel, args.window, args.exec_once, args.ksm)
    if args.busy:
        await busy_level(args.busy, args.parallel, args.busy_seconds)


if __name__ == "__main__":
    asyncio.run(main())
