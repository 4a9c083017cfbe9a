"""A ready-made minimal raw-VM guest: a Debian kernel plus a busybox initramfs.

Its ``/init`` loads the virtio and power-button modules, makes the ACPI power button power the guest
off (so ``vm.stop()`` is graceful), prints :data:`READY_MARKER` and runs a shell that owns the console
(so Ctrl-C reaches it), with the prompt :data:`PROMPT`. Built once and cached by recipe hash.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from capsa._paths import cache_dir
from capsa.image.initramfs import cached_initramfs
from capsa.image.kernels import GuestKernel, debian_kernel

READY_MARKER = "CAPSA-BUSYBOX-READY"
PROMPT = "# "
MODULES = ("virtio_mmio", "virtio_pci", "virtio_blk", "button", "evdev")

INIT = f"""#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in /lib/modules/*.ko; do insmod "$m" 2>/dev/null; done
for ev in /dev/input/event*; do
  (head -c 1 "$ev" >/dev/null 2>&1 && poweroff -f) &
done
# Late kernel messages (e.g. clocksource switches) would interleave with command output on the
# console; from here on only emergencies (panics) are printed.
echo 1 > /proc/sys/kernel/printk
echo {READY_MARKER}
export PS1='{PROMPT}'
exec setsid cttyhack sh
"""


@dataclass(frozen=True)
class GuestFiles:
    kernel: Path
    initrd: Path
    kernel_version: str


def busybox_guest(flavour: str = "cloud-amd64", kernel: GuestKernel | None = None) -> GuestFiles:
    """Kernel and initramfs of the minimal busybox guest (fetched/built on first use, then cached).
    ``kernel`` overrides the Debian kernel of ``flavour`` (e.g. ``default_kernel()``)."""
    kernel = kernel or debian_kernel(flavour)
    initrd = cached_initramfs(
        INIT, cache_dir() / "busybox-guests", "busybox", kernel=kernel, modules=MODULES
    )
    return GuestFiles(kernel.path, initrd, kernel.release)
