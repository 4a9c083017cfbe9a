"""What a UEFI VM needs on disk before QEMU starts: its variable store and its disk overlay."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from capsa.accelerator import Resolved, cached_verdict, kvm_device_usable, resolve_accelerator
from capsa.backend.qemu.process import find_qemu
from capsa.boot import UefiBoot
from capsa.errors import CapsaError, ConfigError
from capsa.uefi.disk import DiskFormat, check_disk_file, create_overlay
from capsa.uefi.firmware import copy_vars, resolve

log = logging.getLogger(__name__)

# vm dir -> open fd holding flock(LOCK_EX) on that VM's user-owned variable store
_VARS_LOCKS: dict[Path, int] = {}
_LOCKS_GUARD = threading.Lock()

# Where a KVM probe for a UEFI VM gets a kernel to boot (it has none of its own). The image layer
# above supplies it (``capsa/__init__.py`` sets the stock guest kernel, downloaded on first call):
# the VM layer must not import the image layer.
_probe_kernel: Callable[[], Path] | None = None


def set_probe_kernel(provider: Callable[[], Path]) -> None:
    """Set the function :func:`uefi_accelerator` calls (in a thread, only when a KVM verdict is
    needed and none is cached) for the kernel it probes KVM with. It may download; a
    :class:`~capsa.errors.CapsaError` from it means TCG."""
    global _probe_kernel
    _probe_kernel = provider


@dataclass(frozen=True)
class UefiLaunch:
    """The files one UEFI VM runs on (all but ``code`` and a user ``vars`` live in its VM dir)."""

    code: Path  # OVMF code, mapped read-only
    vars: Path  # this VM's variable store, writable
    disk: Path  # the overlay (or the user's image with writable=True)
    disk_format: DiskFormat
    secure_boot: bool


def prepare_uefi(boot: UefiBoot, vm_dir: Path) -> UefiLaunch:
    """Copy the variable store and create the disk overlay inside ``vm_dir`` (removed with the VM).
    A user ``vars`` file is locked for this VM until :func:`release_uefi` (QEMU does not lock it)."""
    code, template = resolve(boot.firmware, boot.vars, boot.secure_boot)
    if boot.vars is None:
        variables = copy_vars(template, vm_dir / "efivars.fd")
    else:
        variables = boot.vars
        if not variables.exists():
            copy_vars(template, variables)
            log.info("created UEFI variable store %s from %s", variables, template)
        _lock_vars(variables, vm_dir)
    try:
        fmt = check_disk_file(boot.disk, writable=boot.writable)
        # Absolute paths: QEMU reads a relative name such as "nbd:host:port" as a protocol.
        code, variables = code.absolute(), variables.absolute()
        if boot.writable:
            return UefiLaunch(code, variables, boot.disk.absolute(), fmt, boot.secure_boot)
        overlay = create_overlay(boot.disk, fmt, vm_dir.absolute() / "disk-overlay.qcow2")
        return UefiLaunch(code, variables, overlay, "qcow2", boot.secure_boot)
    except BaseException:
        release_uefi(vm_dir)
        raise


def _lock_vars(path: Path, vm_dir: Path) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(
            f"UEFI variable store {path} is in use by another running VM",
            hint="two VMs must never share one store: give each its own vars= file, or none",
        ) from None
    with _LOCKS_GUARD:
        _VARS_LOCKS[vm_dir] = fd


def release_uefi(vm_dir: Path) -> None:
    """Unlock the user's variable store of the VM in ``vm_dir`` (idempotent; a no-op without one)."""
    with _LOCKS_GUARD:
        fd = _VARS_LOCKS.pop(vm_dir, None)
    if fd is not None:
        os.close(fd)


async def prepare_uefi_async(boot: UefiBoot, vm_dir: Path) -> UefiLaunch:
    """:func:`prepare_uefi` off the event loop (it runs qemu-img and copies files)."""
    return await asyncio.to_thread(prepare_uefi, boot, vm_dir)


async def uefi_accelerator(requested: str) -> Resolved:
    """KVM or TCG for a UEFI VM. ``auto`` needs a kernel to probe KVM with: the cached verdict is
    used when there is one, else the kernel from :func:`set_probe_kernel` is probed (the stock
    guest kernel, fetched once)."""
    if requested != "auto" or not kvm_device_usable():
        return await resolve_accelerator(requested, Path("/nonexistent"))
    verdict = cached_verdict(find_qemu())
    if verdict is not None:
        return "kvm" if verdict else "tcg"
    provider = _probe_kernel
    if provider is None:
        log.info("no kernel to probe KVM with (none was set); using TCG")
        return "tcg"
    try:
        kernel = await asyncio.to_thread(provider)
    except CapsaError as exc:
        log.info("no kernel to probe KVM with (%s); using TCG", exc.message)
        return "tcg"
    return await resolve_accelerator(requested, kernel)
