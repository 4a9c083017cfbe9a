"""The sandbox and its agent against their floors, side by side in one run (issue: sandbox).

1. cold start: ``capsa.sandbox().cold().build()`` → first ``exec`` result, vs a raw VM booting the
   same kernel, initramfs (same init, same size) and rootfs whose init runs
   ``python3 -c 'print(marker)'`` instead of the agent: the floor of any Python agent.
   (``bench.boot_raw`` shows a raw ``capsa.vm`` boots within ~1% of a hand-written QEMU command
   line, so this floor is bare QEMU.)
   Template restore: ``capsa.sandbox().build()`` (restores the configuration's template) → first
   ``exec`` result, vs its own floor: bare QEMU restoring the same template (start with
   ``-incoming``, load the state, resume), with no agent handshake, identity refresh or exec.
2. ``ping()`` round trip (median of 1000) vs a raw line echo over the same virtio-serial port served by
   a shell loop in the same guest; ``exec("true")`` round trip (median of 300) vs a shell loop that
   reads a line from the port, runs ``/usr/bin/true`` and writes a line back.
3. ``write_file`` + ``read_file`` of 64 MiB vs raw streaming of 64 MiB over the port into a tmpfs file
   (``head -c``) and back (``cat``).

    .venv/bin/python -m bench.sandbox_agent [--runs 5] [--only cold,rtt,bulk]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import capsa
from bench._report import figure, header
from capsa.accelerator import resolve_accelerator
from capsa.backend.qemu.process import find_qemu
from capsa.image.kernels import default_kernel
from capsa.image.sandbox import AGENT_COMMAND, sandbox_image, sandbox_init, sandbox_initramfs
from capsa.runtime import cache_dir
from capsa.sandbox.builder import template_root
from capsa.snapshot.migration import load_state
from capsa.snapshot.store import config_key, config_record, load_snapshot
from capsa.vm.handle import start_incoming

PORT = "capsa.agent"
MARKER = "CAPSA-BENCH-FLOOR"
# The port can be opened only once, so the loops open it read-write on fd 3.
FIND_PORT = (
    "for d in /sys/class/virtio-ports/*; do "
    '[ "$(cat $d/name)" = capsa.agent ] && p=/dev/${d##*/}; done; exec 3<>$p; '
)
FLOORS = {
    "python": f"/usr/bin/python3 -c 'print(\"{MARKER}\")'",
    "echo": "/bin/sh -c '" + FIND_PORT + 'while read l <&3; do echo "$l" >&3; done' + "'",
    "spawn": "/bin/sh -c '"
    + FIND_PORT
    + 'while read l <&3; do /usr/bin/true; echo "$l" >&3; done'
    + "'",
    "stream": "/bin/sh -c '"
    + FIND_PORT
    + "while true; do head -c 67108864 <&3 >/tmp/f; cat /tmp/f >&3; done'",
}
BULK = 64 << 20


def floor_initrd(kind: str) -> Path:
    """The sandbox initramfs with only the final command swapped."""
    init = sandbox_init(FLOORS[kind])
    assert AGENT_COMMAND not in init
    return sandbox_initramfs(default_kernel(), cache_dir() / "bench", init, f"floor-{kind}")


def floor_builder(kind: str) -> capsa.VMBuilder:
    image = sandbox_image()
    boot = capsa.LinuxDirectBoot(image.kernel, floor_initrd(kind)).with_root_disk(
        image.rootfs, read_only=True
    )
    return capsa.vm(boot).cmdline_flag("quiet").virtio_port(PORT)


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def report(name: str, ours: list[float], floor: list[float], goal: str) -> None:
    m_ours, m_floor = median_ms(ours), median_ms(floor)
    print(
        f"{name:34} capsa {m_ours:9.3f} ms   floor {m_floor:9.3f} ms   "
        f"ratio {m_ours / m_floor:5.2f}x   (goal {goal}; n={len(ours)})"
    )


# -- 1. cold start --


async def cold_sandbox(builder: capsa.SandboxBuilder | None = None) -> float:
    start = time.perf_counter()
    vm = await (builder or capsa.sandbox().cold()).build()
    try:
        result = await vm.agent.exec("true").run()
        assert result.exit_code == 0
        return time.perf_counter() - start
    finally:
        await vm.kill()


async def cold_floor() -> float:
    builder = floor_builder("python")
    start = time.perf_counter()
    vm = await builder.build()
    try:
        await vm.console.wait_for(MARKER, timeout=120)
        return time.perf_counter() - start
    finally:
        await vm.kill()


async def bench_cold(runs: int) -> None:
    await cold_sandbox()  # warm the page cache
    await cold_floor()
    ours, floor = [], []
    for _ in range(runs):
        ours.append(await cold_sandbox())
        floor.append(await cold_floor())
    report("1a. cold().build() -> first exec", ours, floor, "<= 1.3x")
    print(f"   absolute cold start: median {median_ms(ours):.0f} ms, min {min(ours) * 1000:.0f} ms")
    figure("sandbox_cold_first_exec_ms", median_ms(ours), "ms")
    figure("sandbox_cold_vs_floor", median_ms(ours) / median_ms(floor), "x", "<= 1.3")
    restored, bare = [], []
    await cold_sandbox(capsa.sandbox())  # make sure the template exists
    for _ in range(runs):
        restored.append(await cold_sandbox(capsa.sandbox()))
        bare.append(await bare_restore())
    report("1b. build() (template) -> first exec", restored, bare, "bare QEMU restore")
    figure("sandbox_restore_first_exec_ms", median_ms(restored), "ms")
    figure("sandbox_restore_vs_bare_restore", median_ms(restored) / median_ms(bare), "x")
    figure("sandbox_restore_vs_cold", median_ms(restored) / median_ms(ours), "x", "<= 0.10")


async def bare_restore() -> float:
    """QEMU alone restoring the default sandbox's template: start, load the state, resume."""
    config = await capsa.sandbox().vm_config()
    qemu, accelerator = find_qemu(), await resolve_accelerator("auto", sandbox_image().kernel)
    directory = template_root() / config_key(config_record(config, qemu, accelerator))
    snapshot = load_snapshot(directory)
    start = time.perf_counter()
    vm = capsa.VM(snapshot.vm_config((), config.network))
    try:
        monitor = await start_incoming(vm, 60)
        await load_state(monitor, snapshot.state, 60, ignore_shared=True)
        await monitor.execute("cont")
        return time.perf_counter() - start
    finally:
        await vm.kill()


# -- raw port helpers --


async def raw_port(kind: str) -> tuple[capsa.VM, asyncio.StreamReader, asyncio.StreamWriter]:
    vm = await floor_builder(kind).build()
    reader, writer = await asyncio.open_connection(sock=vm.port_socket(PORT), limit=1 << 20)
    return vm, reader, writer


async def line_rtts(kind: str, count: int) -> list[float]:
    vm, reader, writer = await raw_port(kind)
    try:
        samples = []
        for i in range(count + 20):
            start = time.perf_counter()
            writer.write(b"%d\n" % i)
            line = await asyncio.wait_for(reader.readline(), 60)
            elapsed = time.perf_counter() - start
            assert line == b"%d\n" % i, line
            if i >= 20:  # the first lines pay for the shell's start
                samples.append(elapsed)
        return samples
    finally:
        writer.close()
        await vm.kill()


async def timed(count: int, warmup: int, op: Callable[[], Awaitable[object]]) -> list[float]:
    samples = []
    for i in range(count + warmup):
        start = time.perf_counter()
        await op()
        if i >= warmup:
            samples.append(time.perf_counter() - start)
    return samples


async def bench_rtt() -> None:
    async with await capsa.sandbox().build() as vm:
        ping = await timed(1000, 20, vm.agent.ping)
        true = await timed(300, 10, vm.agent.exec("true").run)
    echo, spawn = await line_rtts("echo", 1000), await line_rtts("spawn", 300)
    report("2a. ping() vs raw line echo", ping, echo, "<= 3x")
    report('2b. exec("true") vs shell spawn loop', true, spawn, "<= 1.5x")
    figure("agent_ping_ms", median_ms(ping), "ms")
    figure("agent_ping_vs_floor", median_ms(ping) / median_ms(echo), "x", "<= 3")
    figure("agent_exec_true_ms", median_ms(true), "ms")
    figure("agent_exec_true_vs_floor", median_ms(true) / median_ms(spawn), "x", "<= 1.5")


# -- 3. bulk --


async def raw_stream(data: bytes) -> float:
    vm, reader, writer = await raw_port("stream")
    try:
        await asyncio.sleep(1.0)  # let the shell loop reach head -c
        start = time.perf_counter()
        writer.write(data)
        await writer.drain()
        back = await asyncio.wait_for(reader.readexactly(len(data)), 300)
        elapsed = time.perf_counter() - start
        assert back == data
        return elapsed
    finally:
        writer.close()
        await vm.kill()


async def bench_bulk(runs: int) -> None:
    data = os.urandom(BULK)
    ours = []
    async with await capsa.sandbox().build() as vm:
        for _ in range(runs):
            start = time.perf_counter()
            await vm.agent.write_file("/tmp/bulk", data)
            back = await vm.agent.read_file("/tmp/bulk")
            ours.append(time.perf_counter() - start)
            assert back == data
    floor = [await raw_stream(data) for _ in range(runs)]
    m_ours, m_floor = statistics.median(ours), statistics.median(floor)
    mib = 2 * BULK / (1 << 20)
    print(
        f"{'3. 64 MiB write+read vs raw stream':34} capsa {mib / m_ours:7.1f} MiB/s   "
        f"floor {mib / m_floor:7.1f} MiB/s   throughput ratio {m_floor / m_ours:5.2f}x   "
        f"(goal >= 0.5x; n={runs})"
    )
    figure("agent_bulk_mib_s", mib / m_ours, "MiB/s")
    figure("agent_bulk_vs_floor", m_floor / m_ours, "x", ">= 0.5")


async def main(runs: int, only: set[str]) -> None:
    header("sandbox_agent")
    print(f"accelerator: {await capsa.accelerator.resolve_accelerator('auto', sandbox_image().kernel)}")
    if "cold" in only:
        await bench_cold(runs)
    if "rtt" in only:
        await bench_rtt()
    if "bulk" in only:
        await bench_bulk(runs)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--only", default="cold,rtt,bulk")
    args = parser.parse_args()
    asyncio.run(main(args.runs, set(args.only.split(","))))
