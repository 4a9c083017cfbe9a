"""The default sandbox guest: Debian kernel + capsa initramfs + read-only Debian root filesystem.

The root filesystem (slow to build, rarely changes) and the initramfs (milliseconds to build, changes
with capsa's init) are cached separately under ``<cache>/images/``, each keyed by the hash of its
recipe, so upgrading capsa never re-runs mmdebstrap unless the package list changed.

At boot the initramfs mounts the SquashFS root read-only under a tmpfs overlay, so every sandbox starts
from the same clean state and nothing it writes survives it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from capsa._paths import cache_dir
from capsa.errors import ImageError
from capsa.image import rootfs
from capsa.image.debian import fetch_debian_kernel
from capsa.image.initramfs import cached_initramfs

ROOT_READY_MARKER = "CAPSA-ROOT-READY"
INIT_ERROR_MARKER = "CAPSA-INIT-ERROR"
MODULES = (
    "virtio_mmio",
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
    "virtio_rng",
    "squashfs",
    "overlay",
)

INIT = f"""#!/bin/sh
fail() {{ echo "{INIT_ERROR_MARKER}: $*"; poweroff -f; }}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in /lib/modules/*.ko; do insmod "$m" 2>/dev/null; done
i=0
while [ ! -b /dev/vda ]; do
  i=$((i + 1)); [ $i -gt 500 ] && fail "no root disk /dev/vda (virtio-blk driver missing?)"
  sleep 0.01
done
mkdir -p /lower /rw /newroot
mount -t squashfs -o ro /dev/vda /lower || fail "cannot mount the squashfs root on /dev/vda"
mount -t tmpfs -o mode=0755 tmpfs /rw || fail "cannot mount tmpfs"
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /newroot \\
  || fail "cannot mount the overlay root (overlay driver missing?)"
for fs in proc sys dev; do mount --move /$fs /newroot/$fs; done
echo capsa > /newroot/etc/hostname
hostname capsa
echo {ROOT_READY_MARKER}
exec switch_root /newroot /usr/bin/setsid -c /bin/sh
"""


@dataclass(frozen=True)
class SandboxImage:
    kernel: Path
    initrd: Path
    rootfs: Path
    kernel_version: str


def _key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def sandbox_image(*, build: bool = True, progress: rootfs.Progress | None = None) -> SandboxImage:
    """The default sandbox image, built on first use (about a minute) and cached afterwards.

    With ``build=False`` a missing image raises :class:`ImageError` instead of building it.
    """
    kernel = fetch_debian_kernel("cloud-amd64")
    images = cache_dir() / "images"
    images.mkdir(parents=True, exist_ok=True)
    root = images / f"rootfs-{rootfs.SUITE}-{_key(rootfs.recipe())}.sqfs"
    if not root.exists():
        if not build:
            raise ImageError("the sandbox image is not built", hint="run: capsa image build")
        rootfs.build_rootfs(root, progress)
    initrd = cached_initramfs(kernel, INIT, MODULES, images, "initrd")
    return SandboxImage(kernel.kernel, initrd, root, kernel.version)
