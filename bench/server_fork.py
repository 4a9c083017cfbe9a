"""``fork(count=2)`` through ``capsa serve`` and the real E2B SDK vs ``vm.fork(2)`` in-process, side
by side in one run (goal: ratio <= 1.3x).

Each side forks a running, idle sandbox of the same size into two and the time ends when both forks
answer a command (the SDK runs commands as ``/bin/bash -l -c CMD``: the in-process side runs that
same argv). The runs alternate between the sides so the machine's load (shared with other
work) weighs on both alike; medians are compared.

    .venv/bin/python -m bench.server_fork [--runs 8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import time
from pathlib import Path

import capsa
from bench._report import figure, header
from bench.server import BASH_TRUE, KEY, MEMORY, start_server

GOAL = 1.3


Samples = dict[str, list[float]]


async def figures(url: str, runs: int) -> tuple[Samples, Samples]:
    os.environ.update(E2B_API_URL=url, E2B_SANDBOX_URL=url, E2B_API_KEY=KEY)
    from e2b import AsyncSandbox

    parent = await AsyncSandbox.create(timeout=600)
    await parent.commands.run("true")
    vm = await capsa.sandbox().memory_mb(MEMORY).build()
    sdk: Samples = {"call": [], "total": []}
    local: Samples = {"call": [], "total": []}
    try:
        for _ in range(runs):
            start = time.perf_counter()
            forks = await parent.fork(count=2, timeout=120)
            sdk["call"].append(time.perf_counter() - start)
            for fork in forks:
                if isinstance(fork, Exception):
                    raise fork
            await asyncio.gather(*(f.commands.run("true") for f in forks))  # type: ignore[union-attr]
            sdk["total"].append(time.perf_counter() - start)
            await asyncio.gather(*(f.kill() for f in forks))  # type: ignore[union-attr]

            start = time.perf_counter()
            clones = await vm.fork(2)
            local["call"].append(time.perf_counter() - start)
            await asyncio.gather(*(c.agent.exec(BASH_TRUE[0]).args(BASH_TRUE[1:]).run() for c in clones))
            local["total"].append(time.perf_counter() - start)
            await asyncio.gather(*(c.kill() for c in clones))
    finally:
        await vm.kill()
        await parent.kill()
    return sdk, local


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=8)
    args = parser.parse_args()
    header("server_fork")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = Path(f"/tmp/capsa-bench-server-fork-{port}.log")
    server = start_server(port, log)
    try:
        time.sleep(5)  # its warm pools fill before the runs
        sdk, local = asyncio.run(figures(f"http://127.0.0.1:{port}", args.runs))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
        log.unlink(missing_ok=True)
    print(f"{'':34} {'via SDK':>10} {'in-process':>11} {'ratio':>7}  goal")
    rows = (
        ("fork(count=2) -> both run(true)", "total", f"<= {GOAL}x"),
        ("the fork call alone", "call", ""),
    )
    for label, key, goal in rows:
        remote, here = statistics.median(sdk[key]) * 1000, statistics.median(local[key]) * 1000
        print(f"{label:34} {remote:8.1f}ms {here:9.1f}ms {remote / here:6.2f}x  {goal}")
    remote, here = statistics.median(sdk["total"]) * 1000, statistics.median(local["total"]) * 1000
    figure("server_fork2_ms", remote, "ms")
    figure("server_fork2_ratio", remote / here, "x", f"<= {GOAL}")


if __name__ == "__main__":
    main()
