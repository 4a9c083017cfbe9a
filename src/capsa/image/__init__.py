"""Guest images: Debian kernels, initramfs archives, kernel modules."""

from capsa.image.busybox import GuestFiles, busybox_guest
from capsa.image.debian import DebianKernel, fetch_debian_kernel
from capsa.image.initramfs import InitramfsBuilder, find_busybox
from capsa.image.modules import ModuleIndex
from capsa.image.sandbox import SandboxImage, sandbox_image

__all__ = [
    "DebianKernel",
    "GuestFiles",
    "InitramfsBuilder",
    "ModuleIndex",
    "SandboxImage",
    "busybox_guest",
    "fetch_debian_kernel",
    "find_busybox",
    "sandbox_image",
]
