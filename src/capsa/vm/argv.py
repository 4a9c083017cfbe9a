"""Turn a :class:`VMConfig` into a ``qemu-system-x86_64`` argv. Pure: no I/O, no globals."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from capsa.backend.qemu.process import SECCOMP
from capsa.boot import LinuxDirectBoot, UefiBoot
from capsa.errors import ConfigError
from capsa.vm.config import VMConfig, kernel_cmdline
from capsa.vm.uefi_launch import UefiLaunch


@dataclass(frozen=True)
class PlannedShare:
    """A share with its mechanism decided and, for virtio-fs, its virtiofsd socket."""

    tag: str
    host_path: Path
    read_only: bool
    mechanism: Literal["virtiofs", "9p"]
    socket_path: Path | None = None


@dataclass(frozen=True)
class LaunchPlan:
    """Facts decided at start time, outside the frozen config."""

    qemu: str
    accelerator: str  # "kvm" or "tcg"
    console_fd: int
    qmp_fd: int
    host_khz: int | None = None  # for tsc_early_khz under TCG on microvm
    port_fds: tuple[int, ...] = ()  # one socket fd per config.virtio_ports entry, same order
    shares: tuple[PlannedShare, ...] = ()
    incoming: bool = False  # start paused, waiting for a migration stream (snapshot restore)
    net_socket: Path | None = None  # where capsa's network stack listens (-netdev stream)
    net_mac: str | None = None
    uefi: UefiLaunch | None = None  # a UefiBoot's firmware, variable store and disk overlay


def qemu_escape(value: str) -> str:
    """QEMU option syntax: a comma inside a value is written as two commas."""
    return value.replace(",", ",,")


def device_suffix(machine: str) -> str:
    """microvm has virtio-mmio transports (``-device``), q35 has PCI (``-pci``)."""
    return "device" if machine == "microvm" else "pci"


def default_cmdline(config: VMConfig, plan: LaunchPlan) -> dict[str, str | None]:
    defaults: dict[str, str | None] = {"console": "ttyS0", "panic": "-1"}
    boot = config.boot
    if isinstance(boot, LinuxDirectBoot) and boot.root_disk is not None:
        defaults["root"] = "/dev/vda"
    if plan.accelerator == "tcg" and config.machine == "microvm" and plan.host_khz:
        # Without it ~3% of microvm boots under TCG hang calibrating the TSC
        # (docs/architecture.md §Facts).
        defaults["tsc_early_khz"] = str(plan.host_khz)
    if plan.accelerator == "tcg":
        # TCG's TSC is the host's clock: without this the guest's clocksource watchdog checks it
        # twice a second, and each check wakes an idle VM (~1 ms/s of host CPU per idle VM;
        # docs/performance.md §Density).
        defaults["tsc"] = "reliable"
    return defaults


def build_argv(config: VMConfig, plan: LaunchPlan) -> list[str]:
    boot = config.boot
    if isinstance(boot, UefiBoot):
        if plan.uefi is None:
            raise ConfigError("internal: a UefiBoot needs its prepared firmware and disk")
        if config.cmdline or config.cmdline_override is not None:
            raise ConfigError(
                "a UefiBoot's kernel command line comes from the loader on its disk; "
                "cmdline_arg(), cmdline_flag() and cmdline_override() do not apply",
                hint="capsa.image.uefi_disk(..., cmdline=...) bakes one into the image",
            )
        config = replace(config, machine="q35")  # OVMF needs PCI; microvm cannot run it
    elif not isinstance(boot, LinuxDirectBoot):
        raise ConfigError(f"{type(boot).__name__} is not supported by the QEMU backend")
    suffix = device_suffix(config.machine)
    argv = [plan.qemu, "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]
    if config.name:
        argv += ["-name", f"{qemu_escape(config.name)},debug-threads=on"]
    virtiofs = any(share.mechanism == "virtiofs" for share in plan.shares)
    if virtiofs and config.memory_file is not None:
        raise ConfigError("guest RAM in a file (a snapshot restore) cannot be shared with virtiofsd")
    # The backend takes the machine's own RAM id, so migration streams from a plain ``-m`` VM load.
    ram_id = "microvm.ram" if config.machine == "microvm" else "pc.ram"
    backed = virtiofs or config.memory_file is not None
    memory = f",memory-backend={ram_id}" if backed else ""
    if config.machine == "microvm":
        # ACPI on: Debian kernels lack VIRTIO_MMIO_CMDLINE_DEVICES, so devices are found via ACPI.
        pit = "on" if config.pit else "off"
        argv += ["-M", f"microvm,acpi=on,pcie=off,rtc=on,pit={pit}{memory}"]
        if virtiofs:  # vhost-user-fs refuses legacy virtio-mmio
            argv += ["-global", "virtio-mmio.force-legacy=false"]
    elif plan.uefi is not None:
        smm = "on" if plan.uefi.secure_boot else "off"
        argv += ["-M", f"q35,smm={smm},pflash0=uefi-code,pflash1=uefi-vars{memory}"]
        argv += uefi_args(plan.uefi)
    else:
        argv += ["-M", f"q35{memory}"]
    if virtiofs:  # vhost-user-fs needs guest RAM that virtiofsd can map: a shared memfd
        argv += ["-object", f"memory-backend-memfd,id={ram_id},size={config.memory_mb}M,share=on"]
    elif config.memory_file is not None:
        path, share = qemu_escape(str(config.memory_file.path)), config.memory_file.shared
        argv += ["-object", f"memory-backend-file,id={ram_id},size={config.memory_mb}M,"
                 f"mem-path={path},share={'on' if share else 'off'}"]  # fmt: skip
    if plan.accelerator == "kvm":
        argv += ["-accel", "kvm", "-cpu", "host"]
    else:
        argv += ["-accel", f"tcg,thread=multi,tb-size={config.tcg_cache_mb}", "-cpu", "max"]
    argv += ["-smp", str(config.cpus), "-m", f"{config.memory_mb}M"]
    argv += ["-sandbox", SECCOMP]
    if isinstance(boot, LinuxDirectBoot):
        argv += ["-kernel", str(boot.kernel)]
        if boot.initrd is not None:
            argv += ["-initrd", str(boot.initrd)]
        argv += ["-append", kernel_cmdline(config, default_cmdline(config, plan))]
    argv += ["-chardev", f"socket,id=console,fd={plan.console_fd}", "-serial", "chardev:console"]
    argv += ["-chardev", f"socket,id=qmp,fd={plan.qmp_fd}", "-mon", "chardev=qmp,mode=control"]
    if plan.uefi is not None:  # the boot disk first, and the firmware's first boot option
        drive = f"id=uefidisk,file={qemu_escape(str(plan.uefi.disk))},if=none,"
        drive += f"format={plan.uefi.disk_format},cache=writeback,discard=unmap"
        argv += ["-drive", drive, "-device", "virtio-blk-pci,drive=uefidisk,bootindex=0"]
    for index, disk in enumerate(config.all_disks()):
        drive = (
            # Absolute: a relative name such as "nbd:host:port" or "json:{...}" is a protocol.
            f"id=disk{index},file={qemu_escape(str(disk.path.absolute()))},if=none,format={disk.format},"
            f"readonly={'on' if disk.read_only else 'off'},cache=writeback"
        )
        if disk.volume:  # a full host disk is the guest's EIO, never a VM paused on ENOSPC
            drive += ",werror=report,rerror=report"
        device = f"virtio-blk-{suffix},drive=disk{index}"
        if disk.serial is not None:
            device += f",serial={disk.serial}"
        argv += ["-drive", drive, "-device", device]
    if len(plan.port_fds) != len(config.virtio_ports):
        raise ConfigError("internal: one socket per virtio-serial port is needed")
    if config.virtio_ports:
        argv += ["-device", f"virtio-serial-{suffix},id=vser0,max_ports={len(config.virtio_ports) + 1}"]
    for index, (name, fd) in enumerate(zip(config.virtio_ports, plan.port_fds, strict=True)):
        argv += ["-chardev", f"socket,id=port{index},fd={fd}"]
        argv += ["-device", f"virtserialport,bus=vser0.0,nr={index + 1},chardev=port{index},name={name}"]
    argv += share_args(plan.shares, suffix)
    if config.network is not None:
        if plan.net_socket is None or plan.net_mac is None:
            raise ConfigError("internal: a network needs its stack's socket and MAC")
        path = qemu_escape(str(plan.net_socket))
        argv += ["-netdev", f"stream,id=net0,server=off,addr.type=unix,addr.path={path}"]
        argv += ["-device", f"virtio-net-{suffix},netdev=net0,mac={plan.net_mac}"]
    argv += list(config.extra_qemu_args)
    if plan.incoming:
        argv += ["-incoming", "defer"]
    return argv


def uefi_args(uefi: UefiLaunch) -> list[str]:
    """OVMF as two pflash chips: the code read-only, this VM's variable store writable. With Secure
    Boot, SMM guards the store so the guest OS cannot rewrite the key databases."""
    code = f"driver=file,node-name=uefi-code,filename={qemu_escape(str(uefi.code))},read-only=on"
    store = f"driver=file,node-name=uefi-vars,filename={qemu_escape(str(uefi.vars))}"
    argv = ["-blockdev", code, "-blockdev", store]
    if uefi.secure_boot:
        argv += ["-global", "driver=cfi.pflash01,property=secure,value=on"]
    return argv


def share_args(shares: tuple[PlannedShare, ...], suffix: str) -> list[str]:
    argv: list[str] = []
    for index, share in enumerate(shares):
        if share.mechanism == "virtiofs":
            assert share.socket_path is not None
            argv += ["-chardev", f"socket,id=fs{index},path={qemu_escape(str(share.socket_path))}"]
            argv += ["-device", f"vhost-user-fs-{suffix},chardev=fs{index},tag={share.tag}"]
        else:
            # readonly=on: QEMU itself refuses every write (host-enforced). A writable share uses
            # security_model=mapped-xattr: files are created as QEMU's user with mode 0600 (dirs
            # 0700) and the guest's view of owner, mode and device numbers lives in user.virtfs.*
            # xattrs, so guest root can never leave a set-uid/set-gid file, a device node or a
            # symlink on the host (``none`` passed chmod 4755 and mknod through, as root too).
            path = qemu_escape(str(share.host_path))
            if share.read_only:
                fsdev = f"local,id=fsdev{index},path={path},security_model=none,readonly=on"
            else:
                fsdev = f"local,id=fsdev{index},path={path},security_model=mapped-xattr"
            argv += [
                "-fsdev",
                fsdev,
                "-device",
                f"virtio-9p-{suffix},fsdev=fsdev{index},mount_tag={share.tag}",
            ]
    return argv
