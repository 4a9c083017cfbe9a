"""Which kernel a guest boots: capsa's own (when built) or Debian's stock cloud kernel (fallback)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from capsa.errors import ImageError
from capsa.image.debian import DebianKernel, fetch_debian_kernel
from capsa.image.kernel import build_kernel, built_kernel, find_kernel_source, missing_build_tools

log = logging.getLogger(__name__)

KernelKind = Literal["capsa", "debian"]


@dataclass(frozen=True)
class GuestKernel:
    """A kernel to boot plus what an initramfs for it needs to know."""

    path: Path
    release: str  # ``uname -r``
    kind: KernelKind
    key: str  # identifies the exact build, for cache keys
    modules_dir: Path | None  # Debian: where its modules are; capsa's kernel has none (built in)

    @classmethod
    def from_debian(cls, kernel: DebianKernel) -> GuestKernel:
        return cls(kernel.kernel, kernel.version, "debian", kernel.package, kernel.modules_dir)


def debian_kernel(flavour: str = "cloud-amd64") -> GuestKernel:
    return GuestKernel.from_debian(fetch_debian_kernel(flavour))


def default_kernel(*, build: bool = False) -> GuestKernel:
    """capsa's fast kernel if it is built (with ``build=True``: build it now when the source and
    toolchain are installed); otherwise the stock Debian cloud kernel, with its modules."""
    built = built_kernel()
    if built is None and build and kernel_build_possible():
        built = build_kernel()
    if built is None:
        return debian_kernel()
    # The uncompressed vmlinux, booted through its PVH entry, skips the decompressor (~60 ms less
    # under TCG than the bzImage; bench/kernel_boot.py).
    return GuestKernel(built.vmlinux, built.release, "capsa", built.directory.name, None)


def kernel_build_possible() -> bool:
    try:
        find_kernel_source()
    except ImageError:
        return False
    return not missing_build_tools()


def default_kernel_status() -> tuple[bool, str]:
    """For ``capsa doctor``: is capsa's kernel in use, and if not, why and how to fix it."""
    built = built_kernel()
    if built is not None:
        return True, f"capsa kernel {built.release} ({built.bzimage})"
    try:
        find_kernel_source()
    except ImageError:
        return False, "stock Debian kernel (fallback): linux-source-6.1 is not installed"
    missing = missing_build_tools()
    if missing:
        return False, f"stock Debian kernel (fallback): missing {', '.join(missing)}"
    return False, "stock Debian kernel (fallback): capsa's kernel is not built yet"
