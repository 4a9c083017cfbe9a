"""``capsa.vm(boot)``: an immutable builder for raw VMs."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from capsa._context import BuildsOnEnter
from capsa.boot import BootConfig, LinuxDirectBoot, UefiBoot
from capsa.errors import ConfigError
from capsa.net.gateway import VirtualNetwork
from capsa.shares.spec import AccessMode, Mechanism, check_shares, make_share
from capsa.vm.config import (
    DiskFormat,
    DiskSpec,
    VMConfig,
    detect_disk_format,
    validate_cmdline_key,
    validate_cmdline_text,
    validate_cmdline_value,
    validate_lifetime,
    validate_port_name,
)
from capsa.vm.handle import VM, start_lifetime
from capsa.vm.options import CommonOptions
from capsa.vm.pvh import is_bzimage, pvh_kernel
from capsa.volume.spec import serial
from capsa.volume.store import Volume

log = logging.getLogger(__name__)

_MACHINES = ("microvm", "q35")
_FORMATS = ("raw", "qcow2")


class VMBuilder(CommonOptions, BuildsOnEnter[VM]):
    """Each method returns a new builder; the original is unchanged. ``await builder.build()`` starts
    the VM. ``async with capsa.vm(boot)... as vm:`` builds, then stops the VM on exit."""

    def __init__(self, config: VMConfig, lifetime: float | None = None) -> None:
        self._config = config
        self._lifetime = lifetime

    @property
    def config(self) -> VMConfig:
        return self._config

    def _with(self, **changes: Any) -> VMBuilder:
        return VMBuilder(replace(self._config, **changes), self._lifetime)

    def lifetime(self, seconds: float) -> VMBuilder:
        """Stop and remove the VM ``seconds`` after ``build()`` returns; from then on every call on it
        raises ``VMNotRunning`` saying its lifetime expired. ``vm.set_lifetime(s)`` changes it later."""
        return VMBuilder(self._config, validate_lifetime(seconds))

    def cmdline_arg(self, key: str, value: str) -> VMBuilder:
        """Set ``key=value`` on the kernel command line (replacing an earlier value of ``key``)."""
        entry = (validate_cmdline_key(key), validate_cmdline_value(str(value)))
        return self._with(cmdline=(*self._config.cmdline, entry))

    def cmdline_flag(self, flag: str) -> VMBuilder:
        """Add a bare word such as ``quiet`` to the kernel command line."""
        return self._with(cmdline=(*self._config.cmdline, (validate_cmdline_key(flag), None)))

    def cmdline_override(self, cmdline: str) -> VMBuilder:
        """Use exactly this kernel command line: no capsa defaults (console, panic, root) at all."""
        return self._with(cmdline_override=validate_cmdline_text(cmdline))

    def disk(
        self, path: str | Path, *, read_only: bool = False, format: DiskFormat | None = None
    ) -> VMBuilder:
        """Attach an extra virtio disk (``/dev/vdb``, ``/dev/vdc``… after the root disk)."""
        if format is not None and format not in _FORMATS:
            raise ConfigError(f"disk format must be 'raw' or 'qcow2', got {format!r}")
        disk_path = Path(path)
        if not disk_path.is_file():
            raise ConfigError(f"disk image not found: {disk_path}")
        fmt: DiskFormat = format or detect_disk_format(disk_path)
        return self._with(disks=(*self._config.disks, DiskSpec(disk_path, read_only, fmt)))

    def volume(self, volume: Volume, *, read_only: bool = False) -> VMBuilder:
        """Attach ``volume`` (``capsa.volume(name)``, an ext4 image) as a disk, locked while the VM
        runs (read-write by one VM, read-only by many). The guest finds it by its serial,
        ``/sys/block/vdX/serial`` = ``capsa-vol-N`` (N counts this VM's volumes from 0), and mounts
        it itself (``mount -t ext4``)."""
        if not isinstance(volume, Volume):
            raise ConfigError("volume() takes a capsa.volume(name)")
        index = sum(1 for d in self._config.disks if d.volume)
        disk = DiskSpec(volume.path, bool(read_only), "raw", serial(index), volume=True)
        return self._with(disks=(*self._config.disks, disk))

    def machine(self, name: str) -> VMBuilder:
        """``microvm`` (default: fastest boot, virtio-mmio) or ``q35`` (PCI)."""
        if name not in _MACHINES:
            raise ConfigError(f"machine must be one of {_MACHINES}, got {name!r}")
        return self._with(machine=name)

    def virtio_port(self, name: str) -> VMBuilder:
        """Add a named virtio-serial port. The guest opens it as ``/dev/vportNpM`` (find it by name in
        ``/sys/class/virtio-ports/*/name``); the host gets a socket from ``vm.port_socket(name)``."""
        name = validate_port_name(name)
        if name in self._config.virtio_ports:
            raise ConfigError(f"virtio-serial port {name!r} is declared twice")
        return self._with(virtio_ports=(*self._config.virtio_ports, name))

    def share(
        self,
        host_path: str | Path,
        guest_path: str,
        mode: AccessMode = AccessMode.READ_ONLY,
        *,
        mechanism: Mechanism = "auto",
    ) -> VMBuilder:
        """Share a host directory (virtio-fs, or 9p with ``mechanism="9p"`` or when no virtiofsd is
        installed). READ_ONLY is enforced on the host. A raw VM mounts it itself: see ``vm.shares``."""
        spec = make_share(host_path, guest_path, mode, mechanism)
        shares = (*self._config.shares, spec)
        check_shares(shares)
        return self._with(shares=shares)

    def network(self, network: VirtualNetwork) -> VMBuilder:
        """A NIC behind capsa's userspace NAT (the guest configures itself by DHCP)."""
        if not isinstance(network, VirtualNetwork):
            raise ConfigError("network() takes a VirtualNetwork")
        return self._with(network=network)

    def qemu_args(self, *args: str) -> VMBuilder:
        """Append raw arguments to QEMU's command line (an escape hatch for devices capsa does not
        model yet, e.g. ``"-device", "virtio-rng-device"``). They are passed verbatim."""
        if not all(isinstance(a, str) and "\0" not in a for a in args):
            raise ConfigError("qemu_args takes strings without NUL bytes")
        return self._with(extra_qemu_args=(*self._config.extra_qemu_args, *args))

    async def build(self, timeout: float = 30.0) -> VM:
        """Validate, start QEMU, and return the running VM (the guest is booting). A bzImage with
        a PVH entry boots through it (:mod:`capsa.vm.pvh`; the log says so)."""
        vm = VM(await _through_pvh(self._config))
        await vm._start(timeout)
        if self._lifetime is not None:
            await start_lifetime(vm, self._lifetime)
        return vm


async def _through_pvh(config: VMConfig) -> VMConfig:
    boot = config.boot
    if not isinstance(boot, LinuxDirectBoot) or not is_bzimage(boot.kernel):
        return config
    elf, why = await asyncio.to_thread(pvh_kernel, boot.kernel)
    if elf is None:
        log.info("%s boots through its bzImage entry: %s", boot.kernel, why)
        return config
    log.info("booting %s through its PVH entry (the ELF inside it: %s)", boot.kernel, elf)
    return replace(config, boot=replace(boot, kernel=elf))


def vm(boot: BootConfig) -> VMBuilder:
    """Start describing a raw VM booted from ``boot``."""
    if not isinstance(boot, (LinuxDirectBoot, UefiBoot)):
        raise ConfigError(f"capsa.vm() takes a LinuxDirectBoot, got {type(boot).__name__}")
    return VMBuilder(VMConfig(boot=boot))
