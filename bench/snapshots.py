"""Instant sandboxes: cold boot vs template restore vs fork, memory per clone, concurrency.

1. ``build()`` -> first exec result: ``cold()`` vs restore of the configuration's template vs
   ``fork()`` of a live sandbox; runs alternate; medians and p95 (goal: restore <= 0.10x cold).
2. Host memory (PSS, from /proc/<pid>/smaps) of 8 idle clones vs one VM (goal <= 4x), split into
   guest RAM (the mapping of the snapshot's memory image, shared copy-on-write) and QEMU itself.
3. How many sandboxes this host sustains at once, each scheduled to run one exec per second: the
   achieved rate against the scheduled one, failures, and the p95 exec latency per level (a level
   "holds" when it achieves >= 95% of its schedule with no failure).

    .venv/bin/python -m bench.snapshots [--runs 10] [--levels 4,8,16]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import capsa
from bench._report import figure, header


def p95(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


async def first_exec(make: Callable[[], Awaitable[capsa.Sandbox]], keep: bool = False) -> float:
    start = time.perf_counter()
    vm = await make()
    try:
        assert (await vm.agent.exec("true").run()).exit_code == 0
        return time.perf_counter() - start
    finally:
        await vm.kill()


def pss_kib(pid: int | None) -> tuple[int, int]:
    """(guest RAM, everything else) in KiB: PSS summed per mapping."""
    assert pid is not None
    guest = other = 0
    mapping = ""
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and not fields[0].endswith(":"):
            mapping = fields[5] if len(fields) > 5 else ""
        elif fields and fields[0] == "Pss:":
            if mapping.endswith("/memory"):
                guest += int(fields[1])
            else:
                other += int(fields[1])
    return guest, other


async def bench_start(runs: int) -> None:
    source = await capsa.sandbox().build()
    await first_exec(capsa.sandbox().build)  # make sure the template exists
    times: dict[str, list[float]] = {"cold": [], "restore": [], "fork": []}

    async def forked() -> capsa.Sandbox:
        return (await source.fork(1))[0]

    try:
        for _ in range(runs):
            times["cold"].append(await first_exec(capsa.sandbox().cold().build))
            times["restore"].append(await first_exec(capsa.sandbox().build))
            times["fork"].append(await first_exec(forked))
    finally:
        await source.kill()
    cold = statistics.median(times["cold"])
    restore = statistics.median(times["restore"])
    print(f"1. build() -> first exec, {runs} runs each (TCG, 1 vCPU, 512 MiB, capsa kernel)")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(
            f"   {name:8} median {median * 1000:7.0f} ms   p95 {p95(samples) * 1000:7.0f} ms   "
            f"{median / cold:5.3f}x cold   {median / restore:5.2f}x restore"
        )
        figure(f"snapshots_{name}_first_exec_ms", median * 1000, "ms")
    figure("snapshots_restore_vs_cold", restore / cold, "x", "<= 0.10")
    fork = statistics.median(times["fork"])
    figure("snapshots_fork_vs_restore", fork / restore, "x", "<= 1.5")
    await bench_fork8(source_builder=capsa.sandbox(), one_fork=fork)


async def bench_fork8(source_builder: capsa.SandboxBuilder, one_fork: float, runs: int = 3) -> None:
    """``fork(8)`` -> all 8 children answered an exec, vs one ``fork()`` (goal <= 2x)."""
    source = await source_builder.build()
    samples = []
    try:
        for _ in range(runs):
            start = time.perf_counter()
            clones = await source.fork(8)
            try:
                await asyncio.gather(*(c.agent.exec("true").run() for c in clones))
                samples.append(time.perf_counter() - start)
            finally:
                for clone in clones:
                    await clone.kill()
    finally:
        await source.kill()
    median = statistics.median(samples)
    print(
        f"   fork(8)  median {median * 1000:7.0f} ms (all 8 answered)   {median / one_fork:5.2f}x one "
        f"fork (goal <= 2x)"
    )
    figure("snapshots_fork8_ms", median * 1000, "ms")
    figure("snapshots_fork8_vs_fork", median / one_fork, "x", "<= 2")


async def bench_memory() -> None:
    one = await capsa.sandbox().build()
    clones: list[capsa.Sandbox] = []
    try:
        await asyncio.sleep(2)
        single = sum(pss_kib(one.pid))
        clones = await one.fork(8)
        await asyncio.sleep(2)
        parts = [pss_kib(c.pid) for c in clones]
    finally:
        for vm in [one, *clones]:
            await vm.kill()
    total = sum(guest + other for guest, other in parts)
    guest = sum(g for g, _ in parts) / len(parts) / 1024
    other = sum(o for _, o in parts) / len(parts) / 1024
    print("2. host memory (PSS of the QEMU processes), idle")
    ratio = total / single
    print(f"   one VM {single / 1024:7.1f} MiB   8 clones {total / 1024:7.1f} MiB   ratio {ratio:5.2f}x")
    figure("snapshots_8_clones_pss_vs_one_vm", ratio, "x", "<= 4")
    print(f"   per clone: guest RAM {guest:5.1f} MiB (shared image + own writes), QEMU {other:5.1f} MiB")


async def sustain(count: int, seconds: float) -> tuple[int, int, list[float]]:
    vms = await asyncio.gather(*(capsa.sandbox().build() for _ in range(count)), return_exceptions=True)
    good = [vm for vm in vms if isinstance(vm, capsa.Sandbox)]
    failures = len(vms) - len(good)
    done = 0
    latencies: list[float] = []

    async def worker(vm: capsa.Sandbox) -> None:
        nonlocal failures, done
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            tick = time.monotonic()
            try:
                result = await vm.agent.exec("true").timeout(10).run()
                latencies.append(time.monotonic() - tick)
                if result.exit_code != 0:
                    failures += 1
                done += 1
            except capsa.CapsaError:
                failures += 1
            await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))

    try:
        await asyncio.gather(*(worker(vm) for vm in good))
    finally:
        for vm in good:
            await vm.kill()
    return done, failures, latencies


async def bench_sustain(levels: list[int], seconds: float) -> None:
    print(f"3. concurrent sandboxes, each scheduled for 1 exec/s, {seconds:.0f} s")
    for count in levels:
        done, failures, latencies = await sustain(count, seconds)
        scheduled = count * seconds
        share = done / scheduled
        worst = p95(latencies) * 1000 if latencies else float("nan")
        verdict = "holds" if share >= 0.95 and not failures else "does NOT hold"
        print(
            f"   {count:3} sandboxes: {done} of {scheduled:.0f} scheduled execs ({share:6.1%}; "
            f"{done / seconds:5.1f}/s of {count}/s), {failures} failures, p95 exec {worst:6.0f} ms: "
            f"{verdict}"
        )
        figure(f"snapshots_sustain_{count}_achieved_share", share, "fraction", ">= 0.95")
        figure(f"snapshots_sustain_{count}_p95_exec_ms", worst, "ms")
        if failures or share < 0.95:
            break


async def main(runs: int, levels: list[int]) -> None:
    header("snapshots")
    await bench_start(runs)
    await bench_memory()
    await bench_sustain(levels, 20.0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--levels", default="4,8,16,24")
    args = parser.parse_args()
    asyncio.run(main(args.runs, [int(x) for x in args.levels.split(",")]))
