"""``capsa doctor``: check what capsa needs on this host and say how to fix what is missing."""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
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
from capsa.vm.host_limits import limits_for


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def register(commands: Any) -> None:
    parser = commands.add_parser("doctor", help="check QEMU, KVM, busybox and the guest kernel")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument(
        "--max-sandboxes",
        type=int,
        metavar="N",
        help="also check the host limits (open files, threads, pids, maps, memory) for N sandboxes",
    )
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


def host_limits(n: int) -> list[Check]:
    """One check per host limit N sandboxes would hit (docs/performance.md §Density)."""
    checks = []
    for limit in limits_for(n):
        allowed = "unlimited" if limit.allowed is None else str(limit.allowed)
        detail = f"{n} sandboxes need {limit.needed}, the host allows {allowed}"
        checks.append(Check(f"limit: {limit.name}", limit.ok, detail, "" if limit.ok else limit.fix))
    return checks


KSM = Path("/sys/kernel/mm/ksm")


def memory_merging(ksm: Path = KSM) -> Check:
    """KSM, for density: never a failure (it is the host owner's trade-off), a suggestion when off.

    capsa marks all of QEMU's memory mergeable (``PR_SET_MEMORY_MERGE``); with KSM running, idle
    sandboxes of one template share their equal pages (docs/performance.md §Density). The price is a
    ksmd thread's CPU and a cross-VM side channel: a guest can time a write to learn whether a page
    equal to its own exists in another VM."""
    try:
        run = (ksm / "run").read_text().strip()
        pages = (ksm / "pages_to_scan").read_text().strip()
        millis = (ksm / "sleep_millisecs").read_text().strip()
    except OSError:
        return Check("memory merging (KSM)", True, "not available (kernel without CONFIG_KSM)")
    if run == "1":
        return Check("memory merging (KSM)", True, f"on: {pages} pages every {millis} ms")
    fix = (
        f"optional, for many idle sandboxes: echo 1 > {ksm}/run (an idle sandbox 22 -> 17 MiB, "
        "~11 with CAPSA_QEMU_ASLR=off; ksmd ~0.03-0.05 cores at 100 pages/20 ms; opens a cross-VM "
        "timing side channel — docs/performance.md §Density)"
    )
    return Check("memory merging (KSM)", True, "off", fix)


def collect(max_sandboxes: int | None = None) -> list[Check]:
    limits = [*host_limits(max_sandboxes), memory_merging()] if max_sandboxes else []
    return [
        _qemu(), _busybox(), *_kvm_and_kernel(), _sandbox_kernel(), _sandbox_image(), _virtiofsd(),
        *_uefi(), *limits,
    ]  # fmt: skip


def run(args: argparse.Namespace) -> int:
    if args.max_sandboxes is not None and args.max_sandboxes < 1:
        raise CapsaError(
            "--max-sandboxes must be at least 1", hint="e.g. capsa doctor --max-sandboxes 500"
        )
    checks = collect(args.max_sandboxes)
    if args.json:
        sys.stdout.write(json.dumps([asdict(c) for c in checks], indent=2) + "\n")
    else:
        table = Table(title="capsa doctor")
        table.add_column("check")
        table.add_column("status")
        table.add_column("detail")
        table.add_column("fix")
        for check in checks:
            bad = "[red]too low[/red]" if check.name.startswith("limit:") else "[red]missing[/red]"
            status = "[green]ok[/green]" if check.ok else bad
            table.add_row(check.name, status, check.detail, check.fix)
        Console().print(table)
    return 0 if all(c.ok for c in checks) else 1
