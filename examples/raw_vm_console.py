"""Boot a raw VM (Debian kernel + busybox initramfs) and run one shell command on its serial console.

.venv/bin/python examples/raw_vm_console.py "uname -a"
"""

from __future__ import annotations

import asyncio
import sys

import capsa
from capsa.image import busybox_guest
from capsa.image.busybox import PROMPT, READY_MARKER


async def main(command: str) -> None:
    guest = busybox_guest()  # downloads the kernel and builds the initramfs on first use
    boot = capsa.LinuxDirectBoot(guest.kernel, guest.initrd)
    async with capsa.vm(boot).cpus(1).memory_mb(256) as vm:
        await vm.console.wait_for(READY_MARKER, timeout=60)
        await vm.console.wait_for(PROMPT, timeout=10)
        output = await vm.console.exec_line(command, timeout=60)
        print(output, end="")
        print(f"[{vm.accelerator}]", file=sys.stderr)


if __name__ == "__main__":
    asyncio.run(main(" ".join(sys.argv[1:]) or "uname -a"))
