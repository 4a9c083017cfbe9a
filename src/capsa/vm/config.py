"""The frozen description of one VM, validated before anything is started."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from capsa.boot import BootConfig, LinuxDirectBoot, check_readable_file
from capsa.errors import ConfigError
from capsa.net.gateway import VirtualNetwork
from capsa.shares.spec import ShareSpec, check_host_dir, check_shares

Accelerator = Literal["auto", "kvm", "tcg"]
Machine = Literal["microvm", "q35"]
DiskFormat = Literal["raw", "qcow2"]

MAX_CPUS = 64
MIN_MEMORY_MB = 64
# x86 COMMAND_LINE_SIZE is 2048 including the terminating NUL.
MAX_CMDLINE = 2047
_CMDLINE_KEY = re.compile(r"^[A-Za-z0-9_.\-]+$")
_CMDLINE_VALUE = re.compile(r"^[\x21-\x7e]*$")  # printable ASCII, no spaces
_QCOW2_MAGIC = b"QFI\xfb"
_PORT_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
MAX_PORTS = 16
# TCG's translation cache (``-accel tcg,tb-size=``). QEMU 7.2 reserves 1 GiB per VM and fills it as
# guest code is translated (one first ``python3`` run touches ~30 MiB), and a sandbox keeps what it
# touched for good: 64 MiB bounds that at no measurable cost, while 32 MiB cost +25% CPU and 16 MiB
# +100% on a python workload (a full cache is flushed and hot code translated again;
# docs/performance.md §Density).
DEFAULT_TCG_CACHE_MB = 64
# Bump when capsa.vm.argv's default_cmdline() or machine options change what a freshly booted guest
# runs: it is part of every template's key (capsa.snapshot.store.config_record), so templates
# recorded with the old defaults are recorded again rather than kept as if they had the new ones.
GUEST_DEFAULTS = 2


_SERIAL = re.compile(r"^[A-Za-z0-9._-]{1,20}$")  # virtio-blk serials are at most 20 bytes


@dataclass(frozen=True)
class DiskSpec:
    """A disk image. ``serial``: the guest reads it in ``/sys/block/vdX/serial`` (how a sandbox finds a
    volume's device whatever the probe order). ``volume``: its content belongs to the user, not to
    the VM's configuration: it is locked while the VM runs (exclusive when writable, shared when
    read-only), a snapshot does not pin its identity, and a full host disk is reported to the guest
    as an I/O error instead of pausing the VM."""

    path: Path
    read_only: bool = False
    format: DiskFormat = "raw"
    serial: str | None = None
    volume: bool = False


def detect_disk_format(path: Path) -> DiskFormat:
    with path.open("rb") as fh:
        return "qcow2" if fh.read(4) == _QCOW2_MAGIC else "raw"


def validate_cpus(cpus: int) -> int:
    if isinstance(cpus, bool) or not isinstance(cpus, int) or not 1 <= cpus <= MAX_CPUS:
        raise ConfigError(f"cpus must be an integer from 1 to {MAX_CPUS}, got {cpus!r}")
    return cpus


def validate_lifetime(seconds: float) -> float:
    """A lifetime: a positive, finite number of seconds (``int`` or ``float``)."""
    value: float | None = None
    if not isinstance(seconds, bool) and isinstance(seconds, (int, float)):
        try:
            value = float(seconds)
        except OverflowError:
            value = None
    if value is None or not math.isfinite(value) or value <= 0:
        raise ConfigError(
            f"lifetime must be a positive, finite number of seconds, got {seconds!r}",
            hint="e.g. .lifetime(300) stops and removes the VM five minutes after it is ready",
        )
    return value


def format_seconds(seconds: float) -> str:
    """``3`` → ``"3s"``, ``2.5`` → ``"2.5s"`` (for messages)."""
    return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"


def host_memory_mb() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 1 << 20


def validate_memory_mb(memory_mb: int) -> int:
    limit = host_memory_mb()
    if isinstance(memory_mb, bool) or not isinstance(memory_mb, int):
        raise ConfigError(f"memory_mb must be an integer, got {memory_mb!r}")
    if not MIN_MEMORY_MB <= memory_mb <= limit:
        raise ConfigError(
            f"memory_mb must be from {MIN_MEMORY_MB} to {limit} (host RAM), got {memory_mb}"
        )
    return memory_mb


def validate_port_name(name: str) -> str:
    if not isinstance(name, str) or not _PORT_NAME.match(name):
        raise ConfigError(
            f"invalid virtio-serial port name {name!r}",
            hint="use lowercase letters, digits, '.', '_' and '-' (at most 64), e.g. 'org.example.0'",
        )
    return name


def validate_cmdline_key(key: str) -> str:
    if not isinstance(key, str) or not _CMDLINE_KEY.match(key):
        raise ConfigError(
            f"invalid kernel cmdline key {key!r}",
            hint="keys are letters, digits, '_', '-' and '.'",
        )
    return key


def validate_cmdline_value(value: str) -> str:
    if not isinstance(value, str) or not _CMDLINE_VALUE.match(value) or '"' in value:
        raise ConfigError(
            f"invalid kernel cmdline value {value!r}",
            hint="values are printable ASCII without spaces or quotes",
        )
    return value


def validate_cmdline_text(text: str) -> str:
    if not isinstance(text, str) or any(c in text for c in "\0\n\r") or not text.isascii():
        raise ConfigError("kernel cmdline must be one line of ASCII text without NUL bytes")
    if len(text) > MAX_CMDLINE:
        raise ConfigError(f"kernel cmdline is {len(text)} bytes; the limit is {MAX_CMDLINE}")
    return text


@dataclass(frozen=True)
class MemoryFile:
    """Guest RAM backed by a file. ``shared``: the guest's writes go to the file (how a snapshot's
    memory image is made); otherwise the mapping is private and copy-on-write over the file, so every
    clone restored from one snapshot shares the pages it has not written."""

    path: Path
    shared: bool


@dataclass(frozen=True)
class VMConfig:
    boot: BootConfig
    cpus: int = 1
    memory_mb: int = 512
    # Ordered (key, value) pairs; value None means a bare flag such as "quiet".
    cmdline: tuple[tuple[str, str | None], ...] = ()
    cmdline_override: str | None = None
    disks: tuple[DiskSpec, ...] = ()
    accelerator: Accelerator = "auto"
    machine: Machine = "microvm"
    name: str | None = None
    # Named virtio-serial ports; the guest finds each in /sys/class/virtio-ports/*/name.
    virtio_ports: tuple[str, ...] = ()
    shares: tuple[ShareSpec, ...] = ()
    network: VirtualNetwork | None = None  # None: no NIC at all
    memory_file: MemoryFile | None = None  # None: anonymous memory (or a memfd for virtio-fs)
    extra_qemu_args: tuple[str, ...] = field(default=())
    tcg_cache_mb: int = DEFAULT_TCG_CACHE_MB  # not part of a snapshot: restores take the default
    # microvm's legacy i8254 PIT. Off: QEMU resets it running (mode 3) and the guest, which uses the
    # LAPIC timer, never stops it, so under TCG it woke QEMU's main loop every 27 ms (~3 ms/s of host
    # CPU per idle VM). On only to restore snapshots taken before (their stream holds its state).
    pit: bool = False

    def all_disks(self) -> tuple[DiskSpec, ...]:
        """Disks in attachment order: the boot's root disk (``/dev/vda``) first."""
        disks = list(self.disks)
        boot = self.boot
        if isinstance(boot, LinuxDirectBoot) and boot.root_disk is not None:
            root = DiskSpec(boot.root_disk, boot.root_disk_read_only, detect_disk_format(boot.root_disk))
            disks.insert(0, root)
        return tuple(disks)

    def validate(self) -> None:
        """Check everything that can be checked without starting QEMU."""
        self.boot.validate()
        validate_cpus(self.cpus)
        validate_memory_mb(self.memory_mb)
        for disk in self.disks:
            check_readable_file(disk.path, "disk")
            if disk.serial is not None and not _SERIAL.match(disk.serial):
                raise ConfigError(
                    f"invalid disk serial {disk.serial!r}", hint="1-20 letters, digits, '.', '_', '-'"
                )
            if not disk.read_only and not os.access(disk.path, os.W_OK):
                raise ConfigError(
                    f"disk {disk.path} is not writable", hint="attach it with read_only=True"
                )
        check_shares(self.shares)
        for share in self.shares:
            check_host_dir(share.host_path)
        for port in self.virtio_ports:
            validate_port_name(port)
        if len(set(self.virtio_ports)) != len(self.virtio_ports):
            raise ConfigError("the same virtio-serial port name is used twice")
        if len(self.virtio_ports) > MAX_PORTS:
            raise ConfigError(f"at most {MAX_PORTS} virtio-serial ports")
        paths = [d.path.resolve() for d in self.all_disks()]
        if len(set(paths)) != len(paths):
            raise ConfigError("the same disk image is attached twice")


def kernel_cmdline(config: VMConfig, defaults: dict[str, str | None]) -> str:
    """The final kernel command line: ``defaults`` then the user's args, a later key replacing an
    earlier one in place. ``cmdline_override`` wins over everything, verbatim."""
    if config.cmdline_override is not None:
        return validate_cmdline_text(config.cmdline_override)
    merged: dict[str, str | None] = dict(defaults)
    for key, value in config.cmdline:
        merged[key] = value
    text = " ".join(k if v is None else f"{k}={v}" for k, v in merged.items())
    return validate_cmdline_text(text)
