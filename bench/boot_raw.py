"""Boot-to-marker: ``capsa.vm(...)`` vs a bare ``qemu-system-x86_64`` command line, same guest.

Both boot the test guest (Debian cloud kernel + busybox initramfs) to the same console marker, on the
same machine type, accelerator and kernel command line; runs alternate to spread machine noise evenly.
Prints medians and the ratio capsa/bare (goal: <= 1.10).

    .venv/bin/python -m bench.boot_raw [--runs 10]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from tests.guest import READY_MARKER, GuestFiles, build_test_guest

import capsa
from bench._report import figure, header
from capsa.accelerator import host_tsc_khz, resolve_accelerator
from capsa.backend.qemu.process import find_qemu


async def capsa_boot(guest: GuestFiles, accel: str) -> float:
    start = time.perf_counter()
    vm = await capsa.vm(capsa.LinuxDirectBoot(guest.kernel, guest.initrd)).accelerator(accel).build()
    try:
        await vm.console.wait_for(READY_MARKER, timeout=120)
        return time.perf_counter() - start
    finally:
        await vm.kill()


async def bare_boot(guest: GuestFiles, accel: str) -> float:
    cmdline = "console=ttyS0 panic=-1"
    khz = host_tsc_khz()
    if accel == "tcg" and khz:
        cmdline += f" tsc_early_khz={khz}"
    accel_args = (
        ["-accel", "kvm", "-cpu", "host"]
        if accel == "kvm"
        else ["-accel", "tcg,thread=multi", "-cpu", "max"]
    )
    argv = [
        find_qemu(), "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-M", "microvm,acpi=on,pcie=off,rtc=on", *accel_args, "-smp", "1", "-m", "512M",
        "-kernel", str(guest.kernel), "-initrd", str(guest.initrd), "-append", cmdline,
        "-serial", "stdio",
    ]  # fmt: skip
    start = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    seen = b""
    try:
        while READY_MARKER.encode() not in seen:
            chunk = await asyncio.wait_for(proc.stdout.read(65536), 120)
            if not chunk:
                raise RuntimeError("bare QEMU exited before the marker")
            seen = seen[-4096:] + chunk
        return time.perf_counter() - start
    finally:
        proc.kill()
        await proc.wait()


async def main(runs: int) -> None:
    header("boot_raw")
    guest = build_test_guest()
    accel = await resolve_accelerator("auto", guest.kernel)
    await capsa_boot(guest, accel)  # warm the page cache and the accelerator verdict
    await bare_boot(guest, accel)
    ours: list[float] = []
    floor: list[float] = []
    for _ in range(runs):
        ours.append(await capsa_boot(guest, accel))
        floor.append(await bare_boot(guest, accel))
    m_ours, m_floor = statistics.median(ours), statistics.median(floor)
    print(f"accelerator: {accel}; runs: {runs} each")
    print(f"capsa.vm boot-to-marker   median {m_ours * 1000:7.0f} ms  (min {min(ours) * 1000:.0f})")
    print(f"bare qemu boot-to-marker  median {m_floor * 1000:7.0f} ms  (min {min(floor) * 1000:.0f})")
    print(f"ratio capsa/bare: {m_ours / m_floor:.3f}  (goal <= 1.10)")
    figure("raw_vm_boot_ms", m_ours * 1000, "ms")
    figure("raw_vm_boot_vs_bare_qemu", m_ours / m_floor, "x", "<= 1.10")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10)
    asyncio.run(main(parser.parse_args().runs))
