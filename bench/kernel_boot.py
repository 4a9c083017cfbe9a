"""capsa's own kernel vs the stock Debian cloud kernel, side by side in one run (issue: fast kernel).

1. Boot to the busybox guest's init marker: built bzImage, built vmlinux (QEMU's PVH entry: no
   decompression) and the stock cloud kernel (with its modules in the initramfs). Goal: built <= 0.5x.
2. Sandbox cold ``build()`` → first exec result on each kernel (same rootfs and agent).

Runs alternate so machine noise spreads evenly; prints medians and ratios against the stock kernel.

    .venv/bin/python -m bench.kernel_boot [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from dataclasses import replace
from pathlib import Path

import capsa
from bench._report import figure, header
from capsa.image.busybox import READY_MARKER, busybox_guest
from capsa.image.kernel import built_kernel
from capsa.image.kernels import GuestKernel, debian_kernel
from capsa.image.sandbox import sandbox_initramfs
from capsa.runtime import cache_dir


async def boot_to_marker(kernel: Path, initrd: Path) -> float:
    start = time.perf_counter()
    vm = await capsa.vm(capsa.LinuxDirectBoot(kernel, initrd)).build()
    try:
        await vm.console.wait_for(READY_MARKER, timeout=120)
        return time.perf_counter() - start
    finally:
        await vm.kill()


async def sandbox_first_exec(kernel: Path, initrd: Path) -> float:
    start = time.perf_counter()
    vm = await capsa.sandbox().kernel(kernel).initrd(initrd).build()
    try:
        assert (await vm.agent.exec("true").run()).exit_code == 0
        return time.perf_counter() - start
    finally:
        await vm.kill()


def line(name: str, samples: list[float], stock: list[float]) -> str:
    median = statistics.median(samples)
    ratio = median / statistics.median(stock)
    return (
        f"  {name:28} median {median * 1000:6.0f} ms  min {min(samples) * 1000:6.0f} ms  "
        f"{ratio:5.2f}x stock"
    )


async def main(runs: int) -> None:
    header("kernel_boot")
    built = built_kernel()
    if built is None:
        raise SystemExit("build the kernel first: capsa kernel build")
    capsa_kernel = GuestKernel(built.bzimage, built.release, "capsa", built.directory.name, None)
    stock = debian_kernel()
    kernels = {
        "stock cloud bzImage": stock,
        "capsa bzImage": capsa_kernel,
        "capsa vmlinux (PVH)": replace(capsa_kernel, path=built.vmlinux),
    }
    bench_dir = cache_dir() / "bench"
    guests = {name: busybox_guest(kernel=k).initrd for name, k in kernels.items()}
    initrds = {
        name: sandbox_initramfs(k, bench_dir, prefix=f"kbench-{k.kind}") for name, k in kernels.items()
    }
    boot: dict[str, list[float]] = {name: [] for name in kernels}
    cold: dict[str, list[float]] = {name: [] for name in kernels}
    for name, kernel in kernels.items():  # warm the page cache
        await boot_to_marker(kernel.path, guests[name])
    for _ in range(runs):
        for name, kernel in kernels.items():
            boot[name].append(await boot_to_marker(kernel.path, guests[name]))
            cold[name].append(await sandbox_first_exec(kernel.path, initrds[name]))
    stock_name = "stock cloud bzImage"
    print(f"runs: {runs} each, accelerator: tcg on this host; capsa kernel {built.release}")
    print("1. boot to init marker (busybox guest), goal: capsa <= 0.5x stock")
    for name in kernels:
        print(line(name, boot[name], boot[stock_name]))
    print("2. sandbox cold build() -> first exec")
    for name in kernels:
        print(line(name, cold[name], cold[stock_name]))
    for name in kernels:
        slug = name.split(" (")[0].replace(" ", "_")
        figure(f"kernel_boot_ms_{slug}", statistics.median(boot[name]) * 1000, "ms")
        figure(f"kernel_cold_first_exec_ms_{slug}", statistics.median(cold[name]) * 1000, "ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    asyncio.run(main(parser.parse_args().runs))
