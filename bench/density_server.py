"""Density through ``capsa serve``: N idle sandboxes created with the real ``e2b`` SDK.

Starts its own ``capsa serve`` (``--max-sandboxes`` N + pool + a few, ``--pool base=4``), creates N
sandboxes through the SDK's async client (``--parallel`` at a time), lets them settle, then over an
idle window measures, per sandbox: host memory (PSS of every QEMU/virtiofsd the server started, the
pool's included, plus what the server process grew by since it was healthy with its pool warm) and idle
CPU per 100 (CPU time of those processes and the server over the window). At the end every sandbox
must answer ``is_running()`` (envd's ``/health``, a ping of its guest agent) within 2 s, all at once
and 16 at a time, and ``commands.run("true")`` (``--at-once`` at a time). The server and everything
it started are stopped at the end, also on Ctrl-C or an error.

    .venv/bin/python -m bench.density_server [--count 200]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._report import figure, header
from bench.density import TICK, cpu_ticks, make_concurrently, pss_kib, sandbox_pids
from bench.server import KEY, start_server, stop_server

POOL = 4
MEMORY = 256


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def create_all(n: int, parallel: int) -> tuple[list[Any], float]:
    from e2b import AsyncSandbox

    async def one() -> Any:
        return await AsyncSandbox.create(timeout=3600, request_timeout=120)

    return await make_concurrently(n, parallel, one, "creates")


async def run_true_all(
    sandboxes: list[Any], at_once: int, limit: float = 2.0
) -> tuple[int, float, float]:
    """``commands.run("true")`` in every sandbox, ``at_once`` at a time, each waited for up to 60 s (a
    command cancelled at 2 s would keep running in its guest and load the next ones): how many
    answered within ``limit``, the median and the slowest."""
    gate = asyncio.Semaphore(at_once)

    async def one(sandbox: Any) -> float:
        async with gate:
            start = time.perf_counter()
            try:
                await sandbox.commands.run("true", request_timeout=60, timeout=60)
            except Exception:  # any failure is a sandbox that did not answer
                return float("inf")
            return time.perf_counter() - start

    times = sorted(await asyncio.gather(*(one(s) for s in sandboxes)))
    answered = sum(t <= limit for t in times)
    return answered, statistics.median(times) if times else 0.0, times[-1] if times else 0.0


async def ping_all(sandboxes: list[Any], at_once: int, limit: float = 2.0) -> tuple[int, float]:
    """``is_running()`` (envd's ``/health``: the guest agent's ping) in every sandbox, ``at_once``
    at a time: how many answered true within ``limit``, and the slowest."""
    gate = asyncio.Semaphore(at_once)

    async def one(sandbox: Any) -> float:
        async with gate:
            start = time.perf_counter()
            try:
                alive = await sandbox.is_running(request_timeout=30)
            except Exception:
                return float("inf")
            return time.perf_counter() - start if alive else float("inf")

    times = sorted(await asyncio.gather(*(one(s) for s in sandboxes)))
    return sum(t <= limit for t in times), times[-1] if times else 0.0


async def kill_all(sandboxes: list[Any]) -> None:
    gate = asyncio.Semaphore(16)

    async def one(sandbox: Any) -> None:
        async with gate:
            with contextlib.suppress(Exception):
                await sandbox.kill()

    await asyncio.shield(asyncio.gather(*(one(s) for s in sandboxes)))


async def measure(
    server: subprocess.Popen[bytes], n: int, parallel: int, window: float, at_once: int
) -> None:
    await asyncio.sleep(5)  # the pool warm
    base_pss = pss_kib(server.pid)
    sandboxes: list[Any] = []
    try:
        sandboxes, elapsed = await create_all(n, parallel)
        await asyncio.sleep(5)  # the pool refilled, the restores settled
        pids = sandbox_pids(server.pid)
        before = {p: cpu_ticks(p) for p in [*pids, server.pid]}
        await asyncio.sleep(window)
        after = {p: cpu_ticks(p) for p in before}
        qemu = sum(after[p] - before[p] for p in pids)
        host = after[server.pid] - before[server.pid]
        growth = max(0, pss_kib(server.pid) - base_pss)
        k = max(1, len(pids))
        pss = (sum(pss_kib(p) for p in pids) + growth) / k / 1024
        idle = (qemu + host) / TICK / window / k * 100
        pinged, ping_slowest = await ping_all(sandboxes, len(sandboxes))
        pinged_gated, ping_gated_slowest = await ping_all(sandboxes, 16)
        answered, median, slowest = await run_true_all(sandboxes, at_once)
        print(
            f"server N={n}: created {len(sandboxes)} through the e2b SDK in {elapsed:.1f} s "
            f"({elapsed / max(1, len(sandboxes)) * 1000:.0f} ms each, {parallel} at a time); "
            f"{len(pids)} QEMUs (pool {POOL} included); PSS {pss:.1f} MiB per sandbox (server grew "
            f"{growth / 1024 / k:.2f} MiB per sandbox); idle CPU {idle:.3f} cores per 100 (QEMU "
            f"{qemu / TICK / window / k * 100:.3f}, server {host / TICK / window / k * 100:.3f}; "
            f"{window:.0f} s window); is_running() (the guest's ping): {pinged}/{len(sandboxes)} "
            f"within 2 s all at once (slowest {ping_slowest * 1000:.0f} ms), {pinged_gated}/"
            f"{len(sandboxes)} 16 at a time (slowest {ping_gated_slowest * 1000:.0f} ms); "
            f"commands.run('true'): {answered}/{len(sandboxes)} within 2 s "
            f"(median {median * 1000:.0f} ms, slowest {slowest * 1000:.0f} ms, {at_once} at a time)",
            flush=True,
        )
        figure(f"density_server_{n}_pss_mib_per_sandbox", pss, "MiB", "<= 15")
        figure(f"density_server_{n}_idle_cores_per_100", idle, "cores", "<= 0.05")
        figure(f"density_server_{n}_pinged_fraction", pinged_gated / max(1, n), "fraction", ">= 1")
        figure(f"density_server_{n}_answered_fraction", answered / max(1, n), "fraction", ">= 1")
    finally:
        await kill_all(sandboxes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--count", type=int, default=200, help="sandboxes created through the SDK")
    parser.add_argument("--parallel", type=int, default=4, help="creates at a time")
    parser.add_argument("--window", type=float, default=20.0, help="idle window in seconds")
    parser.add_argument("--at-once", type=int, default=4, help="commands.run at a time at the end")
    args = parser.parse_args()
    header("density_server")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="capsa-density-server-") as tmp:
        log = Path(tmp) / "serve.log"
        server = start_server(
            port,
            log,
            (f"base={POOL}",),
            MEMORY,
            extra=("--max-sandboxes", str(args.count + POOL + 8)),
        )
        url = f"http://127.0.0.1:{port}"
        os.environ.update(E2B_API_URL=url, E2B_SANDBOX_URL=url, E2B_API_KEY=KEY)
        try:
            asyncio.run(measure(server, args.count, args.parallel, args.window, args.at_once))
        finally:
            stop_server(server)


if __name__ == "__main__":
    main()
