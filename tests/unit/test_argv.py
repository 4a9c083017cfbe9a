"""QEMU argv building and kernel command lines (pure functions, no VM)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

import capsa
from capsa.snapshot.store import Snapshot, config_key, config_record
from capsa.vm.argv import LaunchPlan, build_argv, qemu_escape
from capsa.vm.config import DiskSpec, VMConfig


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    path = tmp_path / "vmlinuz"
    path.write_bytes(b"\0" * 0x202 + b"HdrS" + b"\0" * 100)
    return path


def plan(accel: str = "tcg") -> LaunchPlan:
    return LaunchPlan(qemu="/usr/bin/qemu", accelerator=accel, console_fd=7, qmp_fd=8, host_khz=2600000)


def option(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_microvm_tcg_defaults(kernel: Path) -> None:
    config = capsa.vm(capsa.LinuxDirectBoot(kernel, "/x/initrd")).cpus(2).memory_mb(300).config
    argv = build_argv(config, plan())
    assert argv[0] == "/usr/bin/qemu"
    assert option(argv, "-M") == ["microvm,acpi=on,pcie=off,rtc=on,pit=off"]
    assert option(argv, "-accel") == ["tcg,thread=multi,tb-size=64"]
    assert option(argv, "-smp") == ["2"] and option(argv, "-m") == ["300M"]
    assert option(argv, "-initrd") == ["/x/initrd"]
    assert "-no-reboot" in argv and "-nodefaults" in argv
    assert option(argv, "-append") == ["console=ttyS0 panic=-1 tsc_early_khz=2600000 tsc=reliable"]
    assert "socket,id=console,fd=7" in option(argv, "-chardev")
    assert "socket,id=qmp,fd=8" in option(argv, "-chardev")
    assert option(argv, "-sandbox")[0].startswith("on,")


def test_kvm_uses_host_cpu_and_no_tsc_hint(kernel: Path) -> None:
    argv = build_argv(capsa.vm(capsa.LinuxDirectBoot(kernel)).config, plan("kvm"))
    assert option(argv, "-accel") == ["kvm"] and option(argv, "-cpu") == ["host"]
    assert "tsc_early_khz" not in option(argv, "-append")[0]
    assert "tsc=reliable" not in option(argv, "-append")[0]


def test_density_knobs_tcg_cache_and_pit(kernel: Path) -> None:
    """The translation cache size and the PIT come from the config: a snapshot taken with a PIT
    restores with one (its migration stream holds the device's state)."""
    config = replace(capsa.vm(capsa.LinuxDirectBoot(kernel)).config, tcg_cache_mb=128, pit=True)
    argv = build_argv(config, plan())
    assert option(argv, "-accel") == ["tcg,thread=multi,tb-size=128"]
    assert option(argv, "-M") == ["microvm,acpi=on,pcie=off,rtc=on,pit=on"]
    assert "-initrd" not in argv


def test_user_args_replace_defaults_and_keep_order(kernel: Path) -> None:
    config = (
        capsa.vm(capsa.LinuxDirectBoot(kernel))
        .cmdline_arg("console", "hvc0")
        .cmdline_flag("quiet")
        .cmdline_arg("init", "/sbin/init")
        .config
    )
    cmdline = option(build_argv(config, plan("kvm")), "-append")[0]
    assert cmdline == "console=hvc0 panic=-1 quiet init=/sbin/init"


def test_override_is_verbatim(kernel: Path) -> None:
    config = capsa.vm(capsa.LinuxDirectBoot(kernel)).cmdline_override("root=/dev/sda ro").config
    assert option(build_argv(config, plan()), "-append") == ["root=/dev/sda ro"]


def test_root_disk_first_then_extra_disks(kernel: Path, tmp_path: Path) -> None:
    root = tmp_path / "root,with,commas.img"
    root.write_bytes(b"\0" * 512)
    extra = tmp_path / "extra.qcow2"
    extra.write_bytes(b"QFI\xfb" + b"\0" * 508)
    boot = capsa.LinuxDirectBoot(kernel).with_root_disk(root, read_only=True)
    config = capsa.vm(boot).disk(extra).config
    argv = build_argv(config, plan())
    drives = option(argv, "-drive")
    assert drives[0].startswith(f"id=disk0,file={qemu_escape(str(root))},if=none,format=raw,readonly=on")
    assert "format=qcow2,readonly=off" in drives[1]
    assert option(argv, "-device") == ["virtio-blk-device,drive=disk0", "virtio-blk-device,drive=disk1"]
    assert "root=/dev/vda" in option(argv, "-append")[0]


def test_q35_uses_pci_devices(kernel: Path, tmp_path: Path) -> None:
    disk = tmp_path / "d.img"
    disk.write_bytes(b"\0" * 512)
    config = capsa.vm(capsa.LinuxDirectBoot(kernel)).machine("q35").disk(disk).config
    argv = build_argv(config, plan())
    assert option(argv, "-M") == ["q35"]
    assert option(argv, "-device") == ["virtio-blk-pci,drive=disk0"]
    assert "tsc_early_khz" not in option(argv, "-append")[0]


def test_builder_is_immutable(kernel: Path) -> None:
    base = capsa.vm(capsa.LinuxDirectBoot(kernel))
    two = base.cpus(2)
    assert base.config.cpus == 1 and two.config.cpus == 2
    assert base.cmdline_flag("quiet").config.cmdline == (("quiet", None),)
    assert base.config.cmdline == ()


def test_same_disk_twice_refused(kernel: Path, tmp_path: Path) -> None:
    disk = tmp_path / "d.img"
    disk.write_bytes(b"\0" * 512)
    config = VMConfig(boot=capsa.LinuxDirectBoot(kernel), disks=(DiskSpec(disk), DiskSpec(disk)))
    with pytest.raises(capsa.ConfigError, match="twice"):
        config.validate()


def test_uefi_boot_without_disk_is_refused_clearly(tmp_path: Path) -> None:
    config = replace(capsa.vm(capsa.UefiBoot(tmp_path / "disk.img")).config)
    with pytest.raises(capsa.ConfigError, match="UEFI disk not found"):
        config.validate()


def test_virtio_serial_ports(kernel: Path) -> None:
    config = capsa.vm(capsa.LinuxDirectBoot(kernel)).virtio_port("capsa.agent").virtio_port("b").config
    argv = build_argv(config, replace(plan(), port_fds=(11, 12)))
    assert "virtio-serial-device,id=vser0,max_ports=3" in option(argv, "-device")
    assert "socket,id=port1,fd=12" in option(argv, "-chardev")
    assert "virtserialport,bus=vser0.0,nr=1,chardev=port0,name=capsa.agent" in option(argv, "-device")
    with pytest.raises(capsa.ConfigError):
        capsa.vm(capsa.LinuxDirectBoot(kernel)).virtio_port("Bad Name")


def test_virtiofs_and_9p_shares(kernel: Path, tmp_path: Path) -> None:
    from capsa.vm.argv import PlannedShare

    config = capsa.vm(capsa.LinuxDirectBoot(kernel)).memory_mb(256).config
    shares = (
        PlannedShare("capsa0", tmp_path, True, "virtiofs", tmp_path / "fs0.sock"),
        PlannedShare("capsa1", Path("/data/a,b"), True, "9p"),
        PlannedShare("capsa2", Path("/data/rw"), False, "9p"),
    )
    argv = build_argv(config, replace(plan(), shares=shares))
    assert option(argv, "-M") == ["microvm,acpi=on,pcie=off,rtc=on,pit=off,memory-backend=microvm.ram"]
    assert "memory-backend-memfd,id=microvm.ram,size=256M,share=on" in option(argv, "-object")
    assert "virtio-mmio.force-legacy=false" in option(argv, "-global")
    assert f"socket,id=fs0,path={tmp_path / 'fs0.sock'}" in option(argv, "-chardev")
    assert "vhost-user-fs-device,chardev=fs0,tag=capsa0" in option(argv, "-device")
    fsdevs = option(argv, "-fsdev")
    assert fsdevs[0] == "local,id=fsdev1,path=/data/a,,b,security_model=none,readonly=on"
    assert fsdevs[1] == "local,id=fsdev2,path=/data/rw,security_model=mapped-xattr"
    assert "virtio-9p-device,fsdev=fsdev2,mount_tag=capsa2" in option(argv, "-device")
    only_9p = build_argv(config, replace(plan(), shares=shares[1:]))
    assert "-object" not in only_9p and "-global" not in only_9p  # plain RAM without virtio-fs


def test_virtiofsd_is_wrapped_in_a_read_only_mount_namespace(tmp_path: Path) -> None:
    from capsa.shares.spec import AccessMode, ShareSpec
    from capsa.shares.virtiofsd import virtiofsd_argv

    ro = virtiofsd_argv("/usr/lib/qemu/virtiofsd", ShareSpec(tmp_path, "/mnt"), 9)
    assert ro[:4] == ["unshare", "--mount", "--propagation", "private"] or ro[1:3] == [
        "--user",
        "--map-root-user",
    ]
    script = ro[ro.index("-c") + 1]
    assert "mount -o remount,bind,ro" in script
    assert ro[ro.index("-c") + 3 : ro.index("-c") + 5] == [str(tmp_path), "ro"]
    assert f"source={tmp_path}" in ro and "sandbox=namespace" in ro and "--fd=9" in ro
    rw = virtiofsd_argv("/v", ShareSpec(tmp_path, "/mnt", AccessMode.READ_WRITE), 9)
    assert rw[rw.index("-c") + 4] == "rw"


def test_guest_ram_in_a_file(kernel: Path, tmp_path: Path) -> None:
    from capsa.vm.argv import PlannedShare
    from capsa.vm.config import MemoryFile

    base = capsa.vm(capsa.LinuxDirectBoot(kernel)).memory_mb(256).config
    clone = replace(base, memory_file=MemoryFile(tmp_path / "a,b" / "memory", shared=False))
    argv = build_argv(clone, plan())
    assert option(argv, "-M") == ["microvm,acpi=on,pcie=off,rtc=on,pit=off,memory-backend=microvm.ram"]
    assert (f"memory-backend-file,id=microvm.ram,size=256M,mem-path={tmp_path}/a,,b/memory,share=off"
            in option(argv, "-object"))  # fmt: skip
    q35 = replace(clone, machine="q35", memory_file=MemoryFile(tmp_path / "m", shared=True))
    q35_argv = build_argv(q35, plan())
    assert option(q35_argv, "-M") == ["q35,memory-backend=pc.ram"]
    assert f"memory-backend-file,id=pc.ram,size=256M,mem-path={tmp_path}/m,share=on" in option(
        q35_argv, "-object"
    )
    virtiofs = (PlannedShare("capsa0", tmp_path, True, "virtiofs", tmp_path / "fs0.sock"),)
    with pytest.raises(capsa.ConfigError):
        build_argv(clone, replace(plan(), shares=virtiofs))


def test_virtiofsd_runs_without_xattrs_or_mknod(tmp_path: Path) -> None:
    """No xattrs, no CAP_MKNOD/CAP_SETFCAP; the seccomp filter is tests/security/test_shares.py's."""
    from capsa.shares.spec import AccessMode, ShareSpec
    from capsa.shares.virtiofsd import virtiofsd_argv

    argv = virtiofsd_argv("/v", ShareSpec(tmp_path, "/mnt", AccessMode.READ_WRITE), 9)
    assert "no_xattr" in argv and "modcaps=-mknod:-setfcap" in argv
    assert "xattr" not in argv and not any(a.startswith("xattrmap") for a in argv)


def test_seccomp_filter_refuses_privileged_modes(tmp_path: Path) -> None:
    """The filter itself, on a real child: chmod 4755/2755, mkdir with set-gid, mknod c 1 3 and
    create with 6755 fail with EPERM; ordinary modes, FIFOs and sticky bits work."""
    import subprocess

    from capsa.shares.confine import seccomp_preexec

    script = (
        "touch f; chmod 4755 f; chmod 2755 f; chmod 1755 f; mknod mem c 1 3; mknod p p; "
        'mkdir -m 2755 sg; mkdir -m 755 plain; python3 -c "import os; '
        "os.open('c', os.O_CREAT | os.O_WRONLY, 0o6755)\"; ls -l; true"
    )
    done = subprocess.run(
        ["sh", "-c", script], cwd=tmp_path, preexec_fn=seccomp_preexec(), capture_output=True,
        text=True, timeout=30, check=True,
    )  # fmt: skip
    assert (tmp_path / "f").stat().st_mode & 0o7777 == 0o1755, done.stdout + done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "p", "plain"], done.stderr
    assert done.stderr.count("Operation not permitted") >= 4, done.stderr


def test_seccomp_filter_program_shape() -> None:
    from capsa.shares.confine import filter_program

    for machine in ("x86_64", "aarch64"):
        program = filter_program(machine)
        assert len(program) % 8 == 0 and 20 < len(program) // 8 < 255
    with pytest.raises(capsa.ShareError):
        filter_program("riscv64")


@pytest.mark.parametrize(
    ("name", "escaped"),
    [
        ("a,b", "a\\,b"),
        ("x,source=/etc", "x\\,source=/etc"),
        ("back\\slash", "back\\\\slash"),
        ("trail\\", "trail\\\\"),
        ("\\,,", "\\\\\\,\\,"),
    ],
)
def test_virtiofsd_source_is_escaped(tmp_path: Path, name: str, escaped: str) -> None:
    """Attack: a host path with commas adds options to virtiofsd (``,source=`` serves another
    directory). libfuse's option parser takes backslash escapes (checked against the real binary by
    tests/security/test_shares.py)."""
    from capsa.shares.spec import AccessMode, ShareSpec
    from capsa.shares.virtiofsd import virtiofsd_argv

    share = ShareSpec(tmp_path / name, "/mnt", AccessMode.READ_WRITE)
    argv = virtiofsd_argv("/v", share, 9)
    sources = [a for a in argv if a.startswith("source=")]
    assert sources == [f"source={tmp_path}/{escaped}"]
    # The wrapper script gets the path verbatim, as one argument.
    assert str(tmp_path / name) in argv


def test_9p_path_with_commas_is_one_option(tmp_path: Path, kernel: Path) -> None:
    """Attack: ``path=/x,path=/etc`` would export another directory; commas are doubled."""
    from capsa.vm.argv import PlannedShare

    config = capsa.vm(capsa.LinuxDirectBoot(kernel)).memory_mb(256).config
    shares = (
        PlannedShare("capsa0", Path("/d/x,path=/etc,readonly=off"), False, "9p"),
        PlannedShare("capsa1", Path("/d/y,security_model=none"), True, "9p"),
    )
    fsdevs = option(build_argv(config, replace(plan(), shares=shares)), "-fsdev")
    assert fsdevs == [
        "local,id=fsdev0,path=/d/x,,path=/etc,,readonly=off,security_model=mapped-xattr",
        "local,id=fsdev1,path=/d/y,,security_model=none,security_model=none,readonly=on",
    ]


def test_relative_disk_path_is_never_a_protocol(tmp_path: Path, kernel: Path) -> None:
    """Attack: a disk file named ``nbd:host:port`` or ``json:{...}`` (relative path) would make QEMU
    open a network or arbitrary block device instead; disk paths are made absolute."""
    config = capsa.vm(capsa.LinuxDirectBoot(kernel)).config
    for name in ("nbd:127.0.0.1:10809", 'json:{"driver":"file","filename":"/etc/shadow"}'):
        disks = replace(config, disks=(DiskSpec(Path(name)),))
        [drive] = option(build_argv(disks, plan()), "-drive")
        assert drive.startswith(f"id=disk0,file={qemu_escape(str(Path.cwd() / name))},if=none")


def test_writable_9p_share_needs_user_xattrs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """mapped-xattr keeps the guest's modes in user.* xattrs: a filesystem without them is refused
    at the builder call (the real probe: this tmp dir supports them)."""
    import errno
    import os

    capsa.sandbox().share(tmp_path, "/mnt/x", capsa.AccessMode.READ_WRITE, mechanism="9p")

    def no_xattrs(path: object, name: str) -> bytes:
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "getxattr", no_xattrs)
    with pytest.raises(capsa.ConfigError, match="user xattrs"):
        capsa.sandbox().share(tmp_path, "/mnt/x", capsa.AccessMode.READ_WRITE, mechanism="9p")
    capsa.sandbox().share(tmp_path, "/mnt/x", capsa.AccessMode.READ_ONLY, mechanism="9p")
    capsa.sandbox().share(tmp_path, "/mnt/x", capsa.AccessMode.READ_WRITE, mechanism="virtiofs")


def test_snapshot_record_keeps_the_pit_and_old_records_restore_with_one(
    kernel: Path, tmp_path: Path
) -> None:
    config = capsa.vm(capsa.LinuxDirectBoot(kernel)).config
    record = config_record(config, str(kernel), "tcg")
    assert record["pit"] is False and Snapshot(tmp_path, record).vm_config().pit is False
    old = {k: v for k, v in record.items() if k not in ("pit", "guest_defaults")}
    assert Snapshot(tmp_path, old).vm_config().pit is True  # taken before the PIT went off
    assert config_key(old) != config_key(record)  # so a template of the old defaults is not reused
