"""``capsa.image.uefi_disk()``: turn a kernel + initrd into a disk that UEFI firmware boots.

The disk is GPT with one EFI System Partition holding a unified kernel image (UKI: systemd's EFI stub
with the kernel, initrd, command line and an os-release appended as PE sections) at the removable-media
path ``\\EFI\\BOOT\\BOOTX64.EFI``, so the firmware boots it with no boot entry and no boot-manager
menu (hence no menu timeout). Built without root or loop devices: the GPT is written in Python, the
FAT filesystem by ``mkfs.fat --offset`` straight into the image, the files copied with mtools.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from capsa.errors import ImageError
from capsa.uefi.gpt import ESP_TYPE, SECTOR, Partition, write_gpt

log = logging.getLogger(__name__)

STUB_PATHS = (
    Path("/usr/lib/systemd/boot/efi/linuxx64.efi.stub"),
    Path("/usr/lib/systemd/boot/efi/linuxx64.efi.stub.signed"),
)
ESP_START = 1 << 20  # 1 MiB: the usual alignment
TOOL_TIMEOUT = 120.0
_OS_RELEASE = 'NAME="capsa UKI"\nID=capsa\nPRETTY_NAME="capsa unified kernel image"\n'
_PACKAGES = {
    "objcopy": "binutils",
    "mkfs.fat": "dosfstools",
    "mmd": "mtools",
    "mcopy": "mtools",
}
MIB = 1 << 20


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def _tool(name: str) -> str:
    path = _which(name)
    if path is None:
        raise ImageError(f"uefi_disk needs {name}", hint=f"apt-get install {_PACKAGES[name]}")
    return path


def _run(argv: list[str], env: dict[str, str] | None = None) -> None:
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT, check=False, env=env
        )
    except subprocess.TimeoutExpired:
        raise ImageError(f"{Path(argv[0]).name} did not finish in {TOOL_TIMEOUT:.0f}s") from None
    if done.returncode != 0:
        raise ImageError(
            f"{Path(argv[0]).name} failed (status {done.returncode}): "
            f"{(done.stderr or done.stdout).strip()[-2000:]}"
        )


def missing_tools() -> dict[str, str]:
    """What :func:`uefi_disk` needs and is not installed: {tool: Debian package}."""
    missing = {name: package for name, package in _PACKAGES.items() if _which(name) is None}
    if not any(path.is_file() for path in STUB_PATHS):
        missing["linuxx64.efi.stub"] = "systemd-boot-efi"
    return missing


def find_stub() -> Path:
    for path in STUB_PATHS:
        if path.is_file():
            return path
    raise ImageError(
        "systemd's EFI stub (linuxx64.efi.stub) is not installed",
        hint="apt-get install systemd-boot-efi",
    )


def _pe_layout(stub: Path) -> tuple[int, int]:
    """(image base, end of the last section's virtual range) of a PE32+ file."""
    data = stub.read_bytes()[:4096]
    (pe_offset,) = struct.unpack_from("<I", data, 0x3C)
    if data[:2] != b"MZ" or data[pe_offset : pe_offset + 4] != b"PE\0\0":
        raise ImageError(f"{stub} is not a PE image")
    optional = pe_offset + 24
    if struct.unpack_from("<H", data, optional)[0] != 0x20B:
        raise ImageError(f"{stub} is not a 64-bit (PE32+) image")
    (image_base,) = struct.unpack_from("<Q", data, optional + 24)
    (size_of_image,) = struct.unpack_from("<I", data, optional + 56)
    return image_base, size_of_image


def build_uki(
    kernel: Path, initrd: Path | None, cmdline: str, out: Path, stub: Path | None = None
) -> Path:
    """A unified kernel image: the EFI stub with ``.osrel``, ``.cmdline``, ``.linux`` and ``.initrd``
    sections appended (the layout ``ukify`` produces; Debian 12 has no ukify, so objcopy does it)."""
    stub = stub or find_stub()
    objcopy = _tool("objcopy")
    image_base, end = _pe_layout(stub)
    with tempfile.TemporaryDirectory(prefix="capsa-uki-") as tmp:
        osrel = Path(tmp) / "os-release"
        osrel.write_text(_OS_RELEASE)
        cmd = Path(tmp) / "cmdline"
        cmd.write_bytes(cmdline.encode() + b"\0")
        sections = [(".osrel", osrel), (".cmdline", cmd), (".linux", kernel)]
        if initrd is not None:
            sections.append((".initrd", initrd))
        argv = [objcopy]
        vma = image_base + end
        for name, path in sections:
            vma = (vma + 0xFFFF) & ~0xFFFF
            argv += ["--add-section", f"{name}={path}", "--change-section-vma", f"{name}={vma:#x}"]
            vma += path.stat().st_size
        _run([*argv, str(stub), str(out)])
    return out


def _check_input(path: Path, what: str) -> Path:
    if not path.is_file():
        raise ImageError(f"uefi_disk: {what} not found: {path}")
    if not os.access(path, os.R_OK):
        raise ImageError(f"uefi_disk: cannot read {what} {path}")
    return path


def uefi_disk(
    path: str | Path,
    *,
    kernel: str | Path,
    initrd: str | Path | None = None,
    cmdline: str = "console=ttyS0",
    size_mb: int | None = None,
    format: Literal["raw", "qcow2"] = "raw",
) -> Path:
    """Write a bootable UEFI disk to ``path``: GPT, one EFI System Partition with a UKI of
    ``kernel``/``initrd``/``cmdline`` as ``\\EFI\\BOOT\\BOOTX64.EFI``. ``size_mb``: the whole disk
    (default: the ESP plus 1 MiB of free space at the end). ``format="qcow2"`` converts it.
    The kernel must have the EFI stub (``CONFIG_EFI_STUB``; Debian kernels do)."""
    kernel_path = _check_input(Path(kernel), "kernel")
    initrd_path = _check_input(Path(initrd), "initrd") if initrd is not None else None
    if "\0" in cmdline or "\n" in cmdline:
        raise ImageError("uefi_disk cmdline must be one line without NUL bytes")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".capsa-uki-", dir=out.parent) as tmp:
        uki = build_uki(kernel_path, initrd_path, cmdline, Path(tmp) / "BOOTX64.EFI")
        return efi_app_disk(out, uki, size_mb=size_mb, format=format)


def efi_app_disk(
    path: str | Path,
    app: str | Path,
    *,
    size_mb: int | None = None,
    format: Literal["raw", "qcow2"] = "raw",
) -> Path:
    """Write a GPT disk whose ESP holds the EFI application ``app`` (a UKI, a GRUB image, a shell…)
    as ``\\EFI\\BOOT\\BOOTX64.EFI``, the path firmware boots when it has no boot entry."""
    return esp_disk(path, {"EFI/BOOT/BOOTX64.EFI": app}, size_mb=size_mb, format=format)


def esp_disk(
    path: str | Path,
    files: Mapping[str, str | Path],
    *,
    size_mb: int | None = None,
    format: Literal["raw", "qcow2"] = "raw",
) -> Path:
    """Write a GPT disk with one FAT32 EFI System Partition holding ``files`` (ESP path such as
    ``"EFI/BOOT/BOOTX64.EFI"`` → host file). ``size_mb``: the whole disk (default: the ESP + 1 MiB)."""
    started = time.monotonic()
    out = Path(path)
    sources = {name.strip("/"): _check_input(Path(src), "ESP file") for name, src in files.items()}
    if not sources or any(not name or ".." in name.split("/") for name in sources):
        raise ImageError("esp_disk needs files with relative ESP paths such as EFI/BOOT/BOOTX64.EFI")
    if format not in ("raw", "qcow2"):
        raise ImageError(f"uefi_disk format must be 'raw' or 'qcow2', got {format!r}")
    mkfs, mmd, mcopy = _tool("mkfs.fat"), _tool("mmd"), _tool("mcopy")
    payload = sum(src.stat().st_size for src in sources.values())
    # FAT overhead and rounding: ~10% plus 4 MiB; at least 34 MiB so mkfs.fat can make FAT32.
    esp_mb = max(34, math.ceil(payload * 1.1 / MIB) + 4)
    need_mb = ESP_START // MIB + esp_mb + 1
    total_mb = size_mb if size_mb is not None else need_mb
    if total_mb < need_mb:
        raise ImageError(f"uefi_disk: size_mb={size_mb} is too small; the payload needs {need_mb}")
    directories = sorted(
        {"/".join(name.split("/")[:i]) for name in sources for i in range(1, name.count("/") + 1)}
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".capsa-uefi-", dir=out.parent) as tmp:
        raw = Path(tmp) / "disk.raw"
        total = total_mb * MIB
        first = ESP_START // SECTOR
        last = first + esp_mb * MIB // SECTOR - 1
        with raw.open("wb") as fh:
            fh.truncate(total)  # sparse
            write_gpt(fh, total, [Partition(ESP_TYPE, first, last, "EFI System Partition")])
        _run([mkfs, "-F", "32", "-n", "ESP", f"--offset={first}", str(raw), str(esp_mb * 1024)])
        image = f"{raw}@@{ESP_START}"
        env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
        if directories:
            _run([mmd, "-i", image, *(f"::/{d}" for d in directories)], env)
        for name, src in sources.items():
            _run([mcopy, "-i", image, str(src), f"::/{name}"], env)
        if format == "qcow2":
            converted = Path(tmp) / "disk.qcow2"
            _run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(converted)])
            raw = converted
        raw.replace(out)
    log.info(
        "wrote UEFI disk %s (%d MiB, %s) in %.2fs", out, total_mb, format, time.monotonic() - started
    )
    return out
