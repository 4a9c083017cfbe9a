"""Guest images: Debian kernels, initramfs archives, kernel modules, UEFI disks."""

from capsa.image.busybox import GuestFiles, busybox_guest
from capsa.image.debian import DebianKernel, fetch_debian_kernel
from capsa.image.initramfs import InitramfsBuilder, find_busybox
from capsa.image.kernels import default_kernel
from capsa.image.modules import ModuleIndex
from capsa.image.sandbox import SandboxImage, sandbox_image
from capsa.image.uefi_disk import uefi_disk

__all__ = [
    "DebianKernel",
    "GuestFiles",
    "InitramfsBuilder",
    "ModuleIndex",
    "SandboxImage",
    "busybox_guest",
    "default_kernel",
    "fetch_debian_kernel",
    "find_busybox",
    "sandbox_image",
    "uefi_disk",
]
