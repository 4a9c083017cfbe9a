"""UEFI boot-to-marker: ``capsa.vm(UefiBoot(...))`` vs the same bare QEMU command line, and UEFI vs
direct kernel boot of the same kernel + initrd.

The disk is built by ``capsa.image.uefi_disk`` from the raw-VM test guest (Debian cloud kernel +
busybox initramfs) as a UKI at ``\\EFI\\BOOT\\BOOTX64.EFI``. The bare run does what capsa does per VM
(copy the variable store, create the qcow2 overlay) and then runs capsa's own argv with the serial
console on a socketpair, as capsa has it; it also timestamps the boot phases. Runs alternate to
spread machine noise.

    .venv/bin/python -m bench.uefi_boot [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import statistics
import tempfile
import time
from pathlib import Path

from tests.guest import READY_MARKER, GuestFiles, build_test_guest

import capsa
from capsa.backend.qemu.process import find_qemu
from capsa.image.uefi_disk import uefi_disk
from capsa.vm.argv import LaunchPlan, build_argv
from capsa.vm.uefi_launch import prepare_uefi

CMDLINE = "console=ttyS0 panic=-1"
PHASES = (
    ("firmware: first console output", b"\x1b"),
    ("firmware: boot option started", b"BdsDxe: starting"),
    ("EFI stub: kernel entered", b"Linux version"),
    ("marker", READY_MARKER.encode()),
)


async def capsa_uefi(disk: Path) -> float:
    start = time.perf_counter()
    vm = await capsa.vm(capsa.UefiBoot(disk)).memory_mb(512).accelerator("tcg").build()
    try:
        await vm.console.wait_for(READY_MARKER, timeout=180)
        return time.perf_counter() - start
    finally:
        await vm.kill()


async def capsa_direct(guest: GuestFiles, machine: str) -> float:
    boot = capsa.LinuxDirectBoot(guest.kernel, guest.initrd)
    start = time.perf_counter()
    vm = await capsa.vm(boot).machine(machine).memory_mb(512).accelerator("tcg").build()
    try:
        await vm.console.wait_for(READY_MARKER, timeout=120)
        return time.perf_counter() - start
    finally:
        await vm.kill()


async def bare_uefi(disk: Path) -> tuple[float, dict[str, float]]:
    """capsa's argv run bare: the console on a socketpair as capsa does, no QMP monitor, no capsa
    code while it runs. Returns the total and the phase times."""
    start = time.perf_counter()
    ours, theirs = socket.socketpair()
    with tempfile.TemporaryDirectory(prefix="bench-uefi-") as tmp:
        launch = prepare_uefi(capsa.UefiBoot(disk), Path(tmp))  # vars copy + qemu-img overlay
        config = capsa.vm(capsa.UefiBoot(disk)).memory_mb(512).config
        plan = LaunchPlan(find_qemu(), "tcg", console_fd=theirs.fileno(), qmp_fd=-1, uefi=launch)
        argv = build_argv(config, plan)
        at = argv.index("socket,id=qmp,fd=-1") - 1
        del argv[at : at + 4]  # -chardev socket,id=qmp,... -mon chardev=qmp,...
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, pass_fds=(theirs.fileno(),)
        )
        theirs.close()
        ours.setblocking(False)
        loop = asyncio.get_running_loop()
        seen, phases = b"", {}
        try:
            while READY_MARKER.encode() not in seen:
                chunk = await asyncio.wait_for(loop.sock_recv(ours, 65536), 180)
                if not chunk:
                    raise RuntimeError("bare QEMU exited before the marker")
                seen += chunk
                for name, needle in PHASES:
                    if name not in phases and needle in seen:
                        phases[name] = time.perf_counter() - start
            return time.perf_counter() - start, phases
        finally:
            ours.close()
            if proc.returncode is None:
                proc.kill()
            await proc.wait()


def median_ms(values: list[float]) -> str:
    return f"median {statistics.median(values) * 1000:7.0f} ms  (min {min(values) * 1000:.0f})"


async def main(runs: int) -> None:
    guest = build_test_guest()
    work = Path(tempfile.mkdtemp(prefix="bench-uefi-disk-"))
    try:
        t0 = time.perf_counter()
        disk = uefi_disk(work / "disk.img", kernel=guest.kernel, initrd=guest.initrd, cmdline=CMDLINE)
        build_s = time.perf_counter() - t0
        await capsa_uefi(disk)  # warm the page cache
        ours, bare, direct_microvm, direct_q35 = [], [], [], []
        phase_runs: list[dict[str, float]] = []
        for _ in range(runs):
            ours.append(await capsa_uefi(disk))
            total, phases = await bare_uefi(disk)
            bare.append(total)
            phase_runs.append(phases)
            direct_microvm.append(await capsa_direct(guest, "microvm"))
            direct_q35.append(await capsa_direct(guest, "q35"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"accelerator: tcg; runs: {runs} each; uefi_disk() built the disk in {build_s * 1000:.0f} ms")
    print(f"capsa.vm(UefiBoot) to marker      {median_ms(ours)}")
    print(f"bare qemu, same argv, to marker   {median_ms(bare)}")
    print(f"ratio capsa/bare: {statistics.median(ours) / statistics.median(bare):.3f}  (goal <= 1.10)")
    print(f"direct boot, microvm, to marker   {median_ms(direct_microvm)}")
    print(f"direct boot, q35, to marker       {median_ms(direct_q35)}")
    uefi = statistics.median(ours)
    print(f"ratio UEFI/direct: microvm {uefi / statistics.median(direct_microvm):.2f}, "
          f"q35 {uefi / statistics.median(direct_q35):.2f}")  # fmt: skip
    print("where the bare UEFI boot's time goes (median time since QEMU was started):")
    for name, _ in PHASES:
        values = [p[name] for p in phase_runs if name in p]
        if values:
            print(f"  {name:34s} {statistics.median(values) * 1000:7.0f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    asyncio.run(main(parser.parse_args().runs))
