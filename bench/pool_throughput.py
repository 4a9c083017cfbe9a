"""Throughput of fresh sandboxes: take -> exec -> stop from a pool, no sandbox ever reused.

A pool of ``--size`` sandboxes (default 2) feeds ``--consumers`` workers (default 2); each worker takes
a sandbox, runs one short program in it, destroys it, and takes the next, for ``--seconds``. Prints
programs per minute, host CPU seconds per program (this process and its QEMU children), and where
each program's wall time goes: waiting in ``take()`` (the pool was empty: refill is the bottleneck),
the exec, the stop; and the refill's own time per sandbox (restore to ready).

The program: ``python3 -c`` summing a range, ~25 ms as a local process on this host.

    .venv/bin/python -m bench.pool_throughput [--seconds 30] [--size 2] [--consumers 2]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import resource
import statistics
import subprocess
import sys
import time

import capsa
from bench._report import figure, header

PROGRAM = ["python3", "-c", "print(sum(range(100000)))"]
EXPECTED = "4999950000"


def cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def local_program_ms(runs: int = 10) -> float:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, *PROGRAM[1:]], check=True, capture_output=True, timeout=30)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1000


async def consumer(pool: capsa.Pool, end: float, phases: dict[str, list[float]], discard: str) -> int:
    done = 0
    while time.monotonic() < end:
        t0 = time.perf_counter()
        vm = await pool.take(timeout=120)
        t1 = time.perf_counter()
        try:
            result = await vm.agent.exec(PROGRAM[0]).args(PROGRAM[1:]).timeout(60).run()
            assert result.exit_code == 0 and result.stdout.strip() == EXPECTED, result
        finally:
            t2 = time.perf_counter()
            await (vm.kill() if discard == "kill" else vm.stop())
        t3 = time.perf_counter()
        phases["take"].append(t1 - t0)
        phases["exec"].append(t2 - t1)
        phases["stop"].append(t3 - t2)
        phases["ready"].append(vm.ready_seconds or 0.0)
        done += 1
    return done


async def run(seconds: float, size: int, consumers: int, discard: str) -> None:
    header("pool_throughput")
    local = local_program_ms()
    pool = await capsa.pool(capsa.sandbox(), size=size)
    phases: dict[str, list[float]] = {"take": [], "exec": [], "stop": [], "ready": []}
    try:
        while pool.available < size:  # noqa: ASYNC110 - start measuring with a full pool
            await asyncio.sleep(0.1)
        cpu0, wall0 = cpu_seconds(), time.perf_counter()
        end = time.monotonic() + seconds
        counts = await asyncio.gather(*(consumer(pool, end, phases, discard) for _ in range(consumers)))
        wall, cpu = time.perf_counter() - wall0, cpu_seconds() - cpu0
    finally:
        await pool.close()
    programs = sum(counts)
    rate = programs / wall * 60
    print(
        f"pool of {size}, {consumers} consumers, {discard}, {wall:.1f} s: {programs} programs, "
        f"{rate:.1f} programs/min, {wall / programs:.3f} s wall and "
        f"{cpu / programs:.3f} CPU-s per program (the program alone: {local:.0f} ms locally)"
    )
    for name in ("take", "exec", "stop", "ready"):
        samples = phases[name]
        label = "restore (refill)" if name == "ready" else name
        print(f"   {label:17} median {statistics.median(samples) * 1000:6.0f} ms   "
              f"mean {statistics.mean(samples) * 1000:6.0f} ms")  # fmt: skip
    figure(f"pool_{discard}_programs_per_minute", rate, "1/min")
    figure(f"pool_{discard}_cpu_seconds_per_program", cpu / programs, "s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--size", type=int, default=2)
    parser.add_argument("--consumers", type=int, default=2)
    parser.add_argument("--discard", choices=["stop", "kill"], default="stop")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    if args.verbose:
        logging.basicConfig(level=logging.INFO)
    asyncio.run(run(args.seconds, args.size, args.consumers, args.discard))
