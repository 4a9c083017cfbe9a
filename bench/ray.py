"""capsa.ray against the local agent, side by side in one run (issue 17).

1. ``exec("true")`` round trip through Ray (driver -> host actor -> agent) vs the local agent
   (median of ``--calls``; goal <= 3x); and ``ping()`` both ways, whose difference is the Ray hop.
2. 64 MiB ``write_file`` + ``read_file`` through Ray vs local (throughput ratio; goal >= 0.5x).
3. ``build()`` -> first ``exec`` result through Ray with a warm pool on the node vs a local template
   restore (goal <= 1.5x).

Without ``--address`` it starts a one-node Ray cluster (``capsa_slots: 4``) of its own in a network
namespace with only loopback up (``unshare -n``, as root: Ray binds to the host's interface
address); with ``--address`` it joins an existing cluster. Both sides run on this machine, so the
ratios are the cost of the Ray hop alone.

    .venv/bin/python -m bench.ray [--runs 3] [--calls 200] [--address ADDRESS]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import capsa
from bench._report import figure, header

BULK = 64 << 20
MEMORY = 256


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


async def timed(count: int, op: Callable[[], Awaitable[object]], warmup: int = 10) -> list[float]:
    for _ in range(warmup):
        await op()
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        await op()
        samples.append(time.perf_counter() - started)
    return samples


def report(name: str, ray_ms: float, local_ms: float, goal: str) -> None:
    print(
        f"{name}: ray {ray_ms:.2f} ms, local {local_ms:.2f} ms, ratio {ray_ms / local_ms:.2f}x ({goal})"
    )


async def bench_rtt(local: Any, remote: Any, calls: int) -> None:
    ours = await timed(calls, lambda: remote.agent.exec("true").run())
    floor = await timed(calls, lambda: local.agent.exec("true").run())
    report("exec(true) round trip", median_ms(ours), median_ms(floor), "goal <= 3x")
    figure("ray_exec_true_ms", median_ms(ours), "ms")
    figure("ray_exec_true_vs_local", median_ms(ours) / median_ms(floor), "x", "<= 3")
    # exec("true") is dominated by spawning in the guest (~80 ms under TCG); ping() shows the hop.
    ping_ours = await timed(calls, remote.agent.ping)
    ping_floor = await timed(calls, local.agent.ping)
    report("ping() round trip", median_ms(ping_ours), median_ms(ping_floor), "the Ray hop alone")
    print(f"   Ray hop: +{median_ms(ping_ours) - median_ms(ping_floor):.2f} ms per call")
    figure("ray_ping_ms", median_ms(ping_ours), "ms")
    figure("ray_hop_ms", median_ms(ping_ours) - median_ms(ping_floor), "ms")


async def bench_bulk(local: Any, remote: Any, runs: int) -> None:
    data = os.urandom(BULK)

    async def round_trip(vm: Any) -> float:
        started = time.perf_counter()
        await vm.agent.write_file("/tmp/bulk", data)
        back = await vm.agent.read_file("/tmp/bulk")
        took = time.perf_counter() - started
        assert back == data
        await vm.agent.remove("/tmp/bulk")
        return took

    ours = [await round_trip(remote) for _ in range(runs)]
    floor = [await round_trip(local) for _ in range(runs)]
    mib = 2 * BULK / (1 << 20)
    r_ours, r_floor = mib / statistics.median(ours), mib / statistics.median(floor)
    print(
        f"64 MiB write+read: ray {r_ours:.0f} MiB/s, local {r_floor:.0f} MiB/s, "
        f"ratio {r_ours / r_floor:.2f}x (goal >= 0.5x)"
    )
    figure("ray_bulk_mib_s", r_ours, "MiB/s")
    figure("ray_bulk_vs_local", r_ours / r_floor, "x", ">= 0.5")


async def bench_build(runs: int) -> None:
    import capsa.ray as cray

    recipe = cray.sandbox().memory_mb(MEMORY)
    await cray.warm(recipe, per_node=1)

    async def pool_ready() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            counts = [len(pids) for pids in (await cray.vm_pids()).values()]
            if all(count >= 1 for count in counts):
                return
            await asyncio.sleep(0.1)

    async def remote_first_exec() -> float:
        await pool_ready()
        started = time.perf_counter()
        vm = await recipe.build()
        await vm.agent.exec("true").run()
        took = time.perf_counter() - started
        await vm.stop()
        return took

    async def local_first_exec() -> float:
        started = time.perf_counter()
        vm = await capsa.sandbox().memory_mb(MEMORY).build()
        await vm.agent.exec("true").run()
        took = time.perf_counter() - started
        await vm.stop()
        return took

    ours = [await remote_first_exec() for _ in range(runs)]
    floor = [await local_first_exec() for _ in range(runs)]
    report(
        "build() -> first exec", median_ms(ours), median_ms(floor), "warm pool vs restore, goal <= 1.5x"
    )
    figure("ray_build_first_exec_ms", median_ms(ours), "ms")
    figure("ray_build_first_exec_vs_local_restore", median_ms(ours) / median_ms(floor), "x", "<= 1.5")
    await cray.warm(recipe, per_node=0)


async def main(args: argparse.Namespace) -> None:
    import capsa.ray as cray

    local = await capsa.sandbox().memory_mb(MEMORY).build()
    remote = await cray.sandbox().memory_mb(MEMORY).build()
    try:
        await bench_rtt(local, remote, args.calls)
        await bench_bulk(local, remote, args.runs)
    finally:
        await asyncio.gather(local.stop(), remote.stop())
    await bench_build(args.runs)
    await cray.shutdown()


def run(args: argparse.Namespace) -> None:
    import ray

    if args.address:
        ray.init(address=args.address, logging_level="warning", log_to_driver=False)
        asyncio.run(main(args))
        return
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"capsa_slots": 4}}
    )
    try:
        ray.init(address=cluster.address, logging_level="warning", log_to_driver=False)
        asyncio.run(main(args))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--address", help="an existing Ray cluster (default: start one here)")
    parsed = parser.parse_args()
    if not parsed.address and os.environ.get("CAPSA_RAY_NETNS") != "1":
        if os.geteuid() != 0 or shutil.which("unshare") is None:
            sys.exit("bench.ray needs root and unshare for its own cluster, or --address ADDRESS")
        script = 'ip link set lo up && exec "$0" -m bench.ray "$@"'
        env = {**os.environ, "CAPSA_RAY_NETNS": "1"}
        argv = ["unshare", "-n", "sh", "-c", script, sys.executable, *sys.argv[1:]]
        sys.exit(subprocess.run(argv, env=env, check=False).returncode)
    header("ray")
    run(parsed)
