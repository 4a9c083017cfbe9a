"""``capsa doctor``: check what capsa needs on this host and say how to fix what is missing."""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

from capsa import accelerator
from capsa.backend.qemu.process import QEMU_BINARY
from capsa.errors import CapsaError
from capsa.image import busybox_guest
from capsa.image.initramfs import find_busybox
from capsa.image.kernels import default_kernel_status
from capsa.image.sandbox import sandbox_image
from capsa.image.uefi_disk import missing_tools
from capsa.uefi.firmware import INSTALL_HINT, check_pair, find_firmware


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def register(commands: Any) -> None:
    parser = commands.add_parser("doctor", help="check QEMU, KVM, busybox and the guest kernel")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(handler=run)


def _qemu() -> Check:
    path = shutil.which(QEMU_BINARY)
    if path is None:
        return Check("QEMU", False, "qemu-system-x86_64 not on PATH", "apt-get install qemu-system-x86")
    try:
        version = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        version = "version unknown"
    return Check("QEMU", True, f"{path}: {version}")


def _busybox() -> Check:
    try:
        return Check("busybox (static)", True, str(find_busybox()))
    except CapsaError as exc:
        return Check("busybox (static)", False, exc.message, "apt-get install busybox-static")


def _kvm_and_kernel() -> list[Check]:
    try:
        guest = busybox_guest()
    except CapsaError as exc:
        kernel = Check("guest kernel", False, exc.message, "apt-get update; capsa image busybox")
        return [kernel, Check("accelerator", False, "needs a guest kernel to probe KVM")]
    checks = [Check("guest kernel", True, f"{guest.kernel_version} ({guest.kernel})")]
    if not accelerator.kvm_device_usable():
        checks.append(
            Check(
                "accelerator",
                True,
                "TCG (software emulation): /dev/kvm missing or not accessible",
                "for speed: enable virtualization, or add your user to the 'kvm' group",
            )
        )
        return checks
    try:
        resolved = asyncio.run(accelerator.resolve_accelerator("auto", guest.kernel))
    except CapsaError as exc:
        checks.append(Check("accelerator", False, exc.message, exc.hint or ""))
        return checks
    if resolved == "kvm":
        checks.append(Check("accelerator", True, "KVM (a guest kernel booted under it)"))
    else:
        checks.append(
            Check(
                "accelerator",
                True,
                "TCG: /dev/kvm exists but a stock kernel does not boot under it "
                "(nested or PVM host); capsa falls back to software emulation",
                "run on a host with hardware KVM for ~10x faster guests",
            )
        )
    return checks


def _virtiofsd() -> Check:
    for candidate in ("/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd"):
        if shutil.which(candidate):
            return Check("virtiofsd (shares)", True, candidate)
    return Check("virtiofsd (shares)", False, "not found", "apt-get install qemu-system-common")


def _sandbox_kernel() -> Check:
    """Not an error when missing: sandboxes then boot the stock Debian kernel, only slower."""
    in_use, detail = default_kernel_status()
    fix = "" if in_use else "capsa kernel build (needs linux-source-6.1 and a C toolchain)"
    return Check("sandbox kernel", True, detail, fix)


def _sandbox_image() -> Check:
    try:
        image = sandbox_image(build=False)
    except CapsaError as exc:
        return Check("sandbox image", False, exc.message, "capsa image build")
    return Check("sandbox image", True, f"{image.rootfs.name} ({image.kernel_kind} kernel)")


def _uefi() -> list[Check]:
    """OVMF (UEFI boot), its Secure Boot build, and the tools ``capsa.image.uefi_disk`` runs."""
    checks = []
    for name, secure in (("UEFI firmware (OVMF)", False), ("Secure Boot firmware", True)):
        try:
            found = find_firmware(secure)
            check_pair(found.code, found.vars_template)
        except CapsaError as exc:
            checks.append(Check(name, False, exc.message, INSTALL_HINT))
            continue
        checks.append(Check(name, True, f"{found.code} + {found.vars_template.name}"))
    missing = missing_tools()
    if missing:
        packages = " ".join(sorted(set(missing.values())))
        detail = f"missing {', '.join(missing)}"
        checks.append(Check("UEFI disk builder", False, detail, f"apt-get install {packages}"))
    else:
        checks.append(Check("UEFI disk builder", True, "EFI stub, objcopy, mkfs.fat and mtools found"))
    return checks


def collect() -> list[Check]:
    return [
        _qemu(), _busybox(), *_kvm_and_kernel(), _sandbox_kernel(), _sandbox_image(), _virtiofsd(),
        *_uefi(),
    ]  # fmt: skip


def run(args: argparse.Namespace) -> int:
    checks = collect()
    if args.json:
        sys.stdout.write(json.dumps([asdict(c) for c in checks], indent=2) + "\n")
    else:
        table = Table(title="capsa doctor")
        table.add_column("check")
        table.add_column("status")
        table.add_column("detail")
        table.add_column("fix")
        for check in checks:
            status = "[green]ok[/green]" if check.ok else "[red]missing[/red]"
            table.add_row(check.name, status, check.detail, check.fix)
        Console().print(table)
    return 0 if all(c.ok for c in checks) else 1
