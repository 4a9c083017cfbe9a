"""What a VM's exit is reported as: the :class:`VMExited` every waiter and later call gets, with the
console and QEMU log tails and, for a known early-boot failure, a hint naming its cause."""

from __future__ import annotations

from capsa.boot import BootConfig, LinuxDirectBoot
from capsa.errors import VMExited
from capsa.vm.pvh import is_bzimage

__all__ = ["early_reset_hint", "exited_error"]


def exited_error(
    code: int | None,
    reason: str | None,
    *,
    failure: str | None,
    console_tail: str,
    qemu_log_tail: str,
    boot: BootConfig,
) -> VMExited:
    """QEMU exited with ``code`` after the guest's ``reason`` (QMP's shutdown reason, if any);
    ``failure``: why capsa stopped it on its own, if it did (it names the exit instead)."""
    what = f"guest {reason}" if reason else "QEMU exited"
    if failure is not None:
        what = failure
    return VMExited(
        f"the VM exited ({what}, QEMU exit status {code})",
        exit_code=code,
        console_tail=console_tail,
        qemu_log_tail=qemu_log_tail,
        hint=early_reset_hint(boot, reason, console_tail),
    )


def early_reset_hint(boot: BootConfig, reason: str | None, console_tail: str) -> str | None:
    """A bzImage without a PVH entry that resets without a panic: name the known cause."""
    if reason != "guest-reset" or "Kernel panic" in console_tail:
        return None
    if not isinstance(boot, LinuxDirectBoot) or not is_bzimage(boot.kernel):
        return None
    return (
        "the guest reset during early boot without a panic: some kernels' 32-bit bzImage entry "
        "faults under QEMU 7.2 TCG (Debian's 6.1.0-57 cloud kernel); boot a kernel built with "
        "CONFIG_PVH=y (capsa then enters its PVH entry) or its uncompressed vmlinux ELF"
    )
