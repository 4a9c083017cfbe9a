"""Boot configurations: how a VM's first code gets loaded."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from capsa.errors import ConfigError
from capsa.uefi.disk import check_disk_file, check_esp
from capsa.uefi.firmware import resolve

_BZIMAGE_MAGIC_OFFSET = 0x202


def check_kernel(path: Path) -> None:
    """Refuse files QEMU could not boot with ``-kernel``: a bzImage ("HdrS") or an ELF vmlinux (PVH)."""
    try:
        with path.open("rb") as fh:
            head = fh.read(_BZIMAGE_MAGIC_OFFSET + 4)
    except FileNotFoundError:
        raise ConfigError(f"kernel not found: {path}", hint="pass the path of a bzImage") from None
    except OSError as exc:
        raise ConfigError(f"cannot read kernel {path}: {exc.strerror}") from None
    if head[:4] == b"\x7fELF" or head[_BZIMAGE_MAGIC_OFFSET:] == b"HdrS":
        return
    raise ConfigError(
        f"{path} is not a Linux kernel (neither a bzImage nor an ELF vmlinux)",
        hint="use the vmlinuz from /boot or capsa.image.fetch_debian_kernel()",
    )


def check_readable_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None


@dataclass(frozen=True)
class LinuxDirectBoot:
    """Boot a Linux kernel directly (no bootloader), optionally with an initramfs and a root disk.

    ``with_root_disk`` attaches the image as the first virtio disk (``/dev/vda``) and adds
    ``root=/dev/vda`` to the kernel command line unless one is set explicitly.
    """

    kernel: Path
    initrd: Path | None = None
    root_disk: Path | None = None
    root_disk_read_only: bool = False

    def __init__(
        self,
        kernel: str | Path,
        initrd: str | Path | None = None,
        *,
        root_disk: str | Path | None = None,
        root_disk_read_only: bool = False,
    ) -> None:
        object.__setattr__(self, "kernel", Path(kernel))
        object.__setattr__(self, "initrd", Path(initrd) if initrd is not None else None)
        object.__setattr__(self, "root_disk", Path(root_disk) if root_disk is not None else None)
        object.__setattr__(self, "root_disk_read_only", root_disk_read_only)

    def with_root_disk(self, path: str | Path, *, read_only: bool = False) -> LinuxDirectBoot:
        return replace(self, root_disk=Path(path), root_disk_read_only=read_only)

    def validate(self) -> None:
        check_kernel(self.kernel)
        if self.initrd is not None:
            check_readable_file(self.initrd, "initrd")
        if self.root_disk is not None:
            check_readable_file(self.root_disk, "root disk")


@dataclass(frozen=True)
class UefiBoot:
    """Boot a disk image (raw or qcow2; GPT or MBR with an EFI System Partition) through UEFI
    firmware (OVMF) on a q35 machine, the disk on virtio-blk-pci and the firmware's and OS's output on
    the serial console.

    - ``firmware``/``vars``: OVMF code and variable store. By default the installed OVMF
      (``OVMF_CODE_4M.fd`` + a private copy of ``OVMF_VARS_4M.fd`` per VM; with ``secure_boot=True``
      ``OVMF_CODE_4M.secboot.fd`` + ``OVMF_VARS_4M.ms.fd``, SMM on). ``vars`` names a store the user
      owns, kept across boots (created from the template when it does not exist yet); never let two
      running VMs use the same one.
    - ``writable``: by default the disk is opened through a copy-on-write overlay in the VM's runtime
      directory, so the image is byte-for-byte unchanged afterwards and several VMs can boot it at
      once; ``writable=True`` lets the guest write to it.
    """

    disk: Path
    firmware: Path | None = None
    vars: Path | None = None
    secure_boot: bool = False
    writable: bool = False

    def __init__(
        self,
        disk: str | Path,
        *,
        firmware: str | Path | None = None,
        vars: str | Path | None = None,
        secure_boot: bool = False,
        writable: bool = False,
    ) -> None:
        object.__setattr__(self, "disk", Path(disk))
        object.__setattr__(self, "firmware", Path(firmware) if firmware is not None else None)
        object.__setattr__(self, "vars", Path(vars) if vars is not None else None)
        object.__setattr__(self, "secure_boot", bool(secure_boot))
        object.__setattr__(self, "writable", bool(writable))

    def validate(self) -> None:
        """Check the disk (readable, has an ESP), the firmware and the variable store."""
        fmt = check_disk_file(self.disk, writable=self.writable)
        check_esp(self.disk, fmt)
        if self.vars is not None and not self.vars.exists() and not self.vars.parent.is_dir():
            raise ConfigError(f"UEFI variable store {self.vars}: directory {self.vars.parent} missing")
        resolve(self.firmware, self.vars, self.secure_boot)


BootConfig = LinuxDirectBoot | UefiBoot
