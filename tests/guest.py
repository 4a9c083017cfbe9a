"""The raw-VM test guest: a Debian cloud kernel plus a busybox initramfs made with ``capsa.image``.

Its ``/init`` loads the virtio and power-button modules, arranges for the ACPI power button to power
the guest off (so ``vm.stop()`` is graceful), prints ``READY_MARKER`` and runs a shell that owns the
console (so Ctrl-C reaches it). It is built once and cached, keyed by the recipe's hash.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from capsa._paths import cache_dir
from capsa.image import InitramfsBuilder, ModuleIndex, fetch_debian_kernel

READY_MARKER = "CAPSA-TEST-GUEST-READY"
PROMPT = "# "

MODULES = ["virtio_mmio", "virtio_pci", "virtio_blk", "button", "evdev"]

INIT = f"""#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in /lib/modules/*.ko; do insmod "$m" 2>/dev/null; done
for ev in /dev/input/event*; do
  (head -c 1 "$ev" >/dev/null 2>&1 && poweroff -f) &
done
echo {READY_MARKER}
export PS1='{PROMPT}'
exec setsid cttyhack sh
"""


@dataclass(frozen=True)
class GuestFiles:
    kernel: Path
    initrd: Path
    kernel_version: str


def build_test_guest() -> GuestFiles:
    kernel = fetch_debian_kernel("cloud-amd64")
    recipe = "\n".join([kernel.package, INIT, *MODULES]).encode()
    key = hashlib.sha256(recipe).hexdigest()[:16]
    initrd = cache_dir() / "test-guests" / f"busybox-{key}.cpio"
    if not initrd.exists():
        initrd.parent.mkdir(parents=True, exist_ok=True)
        builder = InitramfsBuilder()
        builder.modules(ModuleIndex(kernel.modules_dir), MODULES)
        builder.init_script(INIT)
        builder.write(initrd)
    return GuestFiles(kernel.kernel, initrd, kernel.version)
