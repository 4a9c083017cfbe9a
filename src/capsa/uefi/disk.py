"""The boot disk of a UEFI VM: check it has an EFI System Partition, and open it copy-on-write."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Literal

from capsa.errors import ConfigError
from capsa.uefi.gpt import HEAD_BYTES, PartitionTable, parse_head

DiskFormat = Literal["raw", "qcow2"]
_QCOW2_MAGIC = b"QFI\xfb"
QEMU_IMG_TIMEOUT = 30.0


def find_qemu_img() -> str:
    path = shutil.which("qemu-img")
    if path is None:
        raise ConfigError("qemu-img not found on PATH", hint="apt-get install qemu-utils")
    return path


def _run_qemu_img(args: list[str]) -> None:
    argv = [find_qemu_img(), *args]
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=QEMU_IMG_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        raise ConfigError(f"qemu-img {args[0]} did not finish in {QEMU_IMG_TIMEOUT:.0f}s") from None
    if done.returncode != 0:
        raise ConfigError(f"qemu-img {args[0]} failed: {done.stderr.strip() or done.returncode}")


def check_disk_file(path: Path, *, writable: bool) -> DiskFormat:
    """Refuse what QEMU could not open; return the image format."""
    if path.is_dir():
        raise ConfigError(f"UEFI disk {path} is a directory", hint="pass a disk image file")
    try:
        with path.open("rb") as fh:
            magic = fh.read(4)
    except FileNotFoundError:
        raise ConfigError(f"UEFI disk not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read UEFI disk {path}: {exc.strerror}") from None
    if writable and not os.access(path, os.W_OK):
        raise ConfigError(
            f"UEFI disk {path} is not writable", hint="drop writable=True to boot it copy-on-write"
        )
    return "qcow2" if magic == _QCOW2_MAGIC else "raw"


def read_head(path: Path, fmt: DiskFormat) -> bytes:
    """The first sectors of the disk as the guest sees them (through qcow2 if need be)."""
    if fmt == "raw":
        with path.open("rb") as fh:
            return fh.read(HEAD_BYTES)
    with tempfile.TemporaryDirectory(prefix="capsa-uefi-") as tmp:
        out = Path(tmp) / "head.raw"
        _run_qemu_img(
            ["dd", "-f", "qcow2", "-O", "raw", "bs=512", f"count={HEAD_BYTES // 512}",
             f"if={path.absolute()}", f"of={out}"]
        )  # fmt: skip
        return out.read_bytes()


def check_esp(path: Path, fmt: DiskFormat) -> PartitionTable:
    """The disk's partition table; a ConfigError if the firmware would find nothing to boot."""
    table = parse_head(read_head(path, fmt))
    if table.scheme == "none":
        raise ConfigError(
            f"UEFI disk {path} has no partition table (neither GPT nor MBR)",
            hint="UEFI boots from an EFI System Partition; capsa.image.uefi_disk() makes one",
        )
    if table.esp is None:
        raise ConfigError(
            f"UEFI disk {path} has a {table.scheme.upper()} partition table but no EFI System Partition",
            hint="the firmware boots \\EFI\\BOOT\\BOOTX64.EFI from a FAT partition of type ESP "
            "(GPT type C12A7328-F81F-11D2-BA4B-00A0C93EC93B, MBR type 0xEF)",
        )
    return table


def create_overlay(base: Path, fmt: DiskFormat, target: Path) -> Path:
    """A qcow2 file in front of ``base``: the guest's writes land in ``target``, ``base`` stays
    byte-for-byte unchanged (QEMU opens a backing file read-only)."""
    _run_qemu_img(["create", "-q", "-f", "qcow2", "-F", fmt, "-b", str(base.resolve()), str(target)])
    return target
