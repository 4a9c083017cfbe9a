"""Notice when UEFI firmware finds nothing it can boot.

OVMF then falls back to its built-in shell, or loops over its boot options forever ("No bootable
option or device was found"); a caller waiting for the OS would just time out. The watcher reads the
VM's console transcript as it grows and returns an error that says which boot options failed and why
(Secure Boot refusing an unsigned loader shows up as "Access Denied" / "Security Violation").
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from pathlib import Path

from capsa.errors import CapsaError

POLL_INTERVAL = 0.25
WATCH_LIMIT = 1 << 20  # past 1 MiB of console output the OS is running: stop looking
_FAILED = re.compile(
    rb"BdsDxe: failed to (?:load|start) (Boot\d{4} \"[^\"\r\n]*\")[^\r\n]*?: ([^\r\n]+)"
)
_GAVE_UP = (b"BdsDxe: No bootable option or device was found", b"UEFI Interactive Shell")
_SECURE_BOOT_REFUSALS = ("Access Denied", "Security Violation")


def firmware_failure(console: bytes) -> CapsaError | None:
    """The boot failure ``console`` shows, if the firmware gave up (or fell back to its shell) after
    a boot option failed."""
    failures = _FAILED.findall(console)
    if not failures or not any(marker in console for marker in _GAVE_UP):
        return None
    reasons: dict[str, str] = {}
    for option, reason in failures:
        reasons.setdefault(option.decode(errors="replace"), reason.decode(errors="replace").strip())
    listed = "; ".join(f"{option}: {reason}" for option, reason in reasons.items())
    message = f"the UEFI firmware could not boot the disk ({listed})"
    if any(r in _SECURE_BOOT_REFUSALS for r in reasons.values()):
        message += "; Secure Boot refused a loader that is not signed by a key the firmware trusts"
        hint = "boot a signed loader (e.g. Debian's shim + GRUB), or use secure_boot=False"
    elif any(r == "Not Found" for r in reasons.values()):
        hint = "put the loader at \\EFI\\BOOT\\BOOTX64.EFI on the ESP (capsa.image.uefi_disk does)"
    else:
        hint = "see vm.log_dir / 'console.log' for the firmware's output"
    return CapsaError(message, hint=hint)


async def watch_firmware(
    transcript: Path, running: Callable[[], bool], interval: float = POLL_INTERVAL
) -> CapsaError | None:
    """Follow ``transcript`` while ``running()``; return the firmware's boot failure if one shows up,
    ``None`` once the VM ended or the OS is well under way."""
    seen = b""
    while running() and len(seen) < WATCH_LIMIT:
        await asyncio.sleep(interval)
        try:
            with transcript.open("rb") as fh:
                fh.seek(len(seen))
                chunk = fh.read(WATCH_LIMIT - len(seen))
        except OSError:
            return None
        if not chunk:
            continue
        seen += chunk
        failure = firmware_failure(seen)
        if failure is not None:
            return failure
    return None
