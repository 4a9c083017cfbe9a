"""Boot a disk through UEFI firmware (OVMF): turn the busybox guest's kernel + initrd into a GPT disk
with a unified kernel image, boot it copy-on-write and run one command on the serial console.

.venv/bin/python examples/uefi_boot.py "cat /sys/firmware/efi/fw_platform_size"

Pass ``--disk PATH`` to boot your own image instead (raw or qcow2, GPT with an EFI System
Partition); the image is never modified.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

import capsa
from capsa.image import busybox_guest, uefi_disk
from capsa.image.busybox import PROMPT, READY_MARKER


async def main(command: str, disk: Path | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        if disk is None:
            guest = busybox_guest()  # downloads the kernel and builds the initramfs on first use
            disk = uefi_disk(Path(tmp) / "disk.img", kernel=guest.kernel, initrd=guest.initrd,
                             cmdline="console=ttyS0 panic=-1 quiet")  # fmt: skip
        async with capsa.vm(capsa.UefiBoot(disk)).memory_mb(512) as vm:
            await vm.console.wait_for(READY_MARKER, timeout=180)  # firmware first: ~5 s under TCG
            await vm.console.wait_for(PROMPT, timeout=30)
            print(await vm.console.exec_line(command, timeout=60), end="")
            print(f"[{vm.accelerator}, UEFI]", file=sys.stderr)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--disk", type=Path, help="a UEFI-bootable disk image of your own")
    parser.add_argument("command", nargs="*", default=["ls", "/sys/firmware/efi"])
    args = parser.parse_args()
    asyncio.run(main(" ".join(args.command), args.disk))
