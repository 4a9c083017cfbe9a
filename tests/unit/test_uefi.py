"""UEFI boot without booting: GPT writing/parsing, UefiBoot validation, firmware pairs, the q35 argv,
the disk and UKI builders (real OVMF files, qemu-img, mtools and objcopy; no VM)."""

from __future__ import annotations

import itertools
import os
import shutil
import struct
import subprocess
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

import capsa
from capsa.image.uefi_disk import build_uki, efi_app_disk, find_stub
from capsa.uefi import firmware as fw
from capsa.uefi.gpt import ESP_TYPE, HEAD_BYTES, Partition, parse_head, read_table, write_gpt
from capsa.vm.argv import LaunchPlan, build_argv
from capsa.vm.uefi_launch import UefiLaunch, prepare_uefi, release_uefi

OVMF = Path("/usr/share/OVMF")
needs_ovmf = pytest.mark.skipif(not (OVMF / "OVMF_CODE_4M.fd").is_file(), reason="ovmf not installed")
needs_mtools = pytest.mark.skipif(
    not (shutil.which("mcopy") and (shutil.which("mkfs.fat") or Path("/usr/sbin/mkfs.fat").exists())),
    reason="mtools/dosfstools not installed",
)
LINUX_DATA = uuid.UUID("0fc63daf-8483-4772-8e79-3d69d8477de4")


def gpt_disk(path: Path, type_guid: uuid.UUID = ESP_TYPE, size: int = 8 << 20) -> Path:
    with path.open("wb") as fh:
        fh.truncate(size)
        write_gpt(fh, size, [Partition(type_guid, 2048, 8191, "part")])
    return path


@pytest.fixture
def esp_disk(tmp_path: Path) -> Path:
    return gpt_disk(tmp_path / "esp.img")


# -- GPT --


def test_gpt_round_trip_and_backup(tmp_path: Path) -> None:
    disk = gpt_disk(tmp_path / "d.img")
    table = read_table(disk)
    assert table.scheme == "gpt"
    assert table.esp == Partition(ESP_TYPE, 2048, 8191, "part")
    data = disk.read_bytes()
    assert data[-512:-504] == b"EFI PART"  # backup header in the last sector
    assert parse_head(data[:512] + data[-512:] + data[1024:HEAD_BYTES]).scheme == "gpt"


@pytest.mark.skipif(shutil.which("sgdisk") is None, reason="gdisk not installed")
def test_gpt_accepted_by_sgdisk(esp_disk: Path) -> None:
    out = subprocess.run(
        ["sgdisk", "-v", str(esp_disk)], check=False, capture_output=True, text=True, timeout=30
    )
    assert "No problems found" in out.stdout, out.stdout
    listing = subprocess.run(
        ["sgdisk", "-p", str(esp_disk)], check=False, capture_output=True, text=True, timeout=30
    )
    assert "EF00" in listing.stdout


def test_corrupt_gpt_is_no_table(esp_disk: Path) -> None:
    data = bytearray(esp_disk.read_bytes()[:HEAD_BYTES])
    data[1024 + 10] ^= 0xFF  # a byte of the first partition entry: the array CRC no longer matches
    assert parse_head(bytes(data)).scheme == "none"


def test_mbr_esp_and_blank() -> None:
    assert parse_head(bytes(HEAD_BYTES)).scheme == "none"
    mbr = bytearray(HEAD_BYTES)
    mbr[446:462] = struct.pack("<4xB3xII", 0xEF, 2048, 4096)
    mbr[510:512] = b"\x55\xaa"
    table = parse_head(bytes(mbr))
    assert table.scheme == "mbr" and table.esp is not None and table.esp.first_lba == 2048
    mbr[450] = 0x83  # a Linux partition only
    assert parse_head(bytes(mbr)).esp is None


# -- UefiBoot.validate --


@needs_ovmf
def test_validate_good_raw_and_qcow2(esp_disk: Path, tmp_path: Path) -> None:
    capsa.UefiBoot(esp_disk).validate()
    qcow2 = tmp_path / "esp.qcow2"
    subprocess.run(
        ["qemu-img", "convert", "-O", "qcow2", str(esp_disk), str(qcow2)], check=True, timeout=30
    )
    capsa.UefiBoot(qcow2).validate()


@needs_ovmf
@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda d: d / "missing.img", "not found"),
        (lambda d: d, "is a directory"),
        (
            lambda d: (d / "zero.img").write_bytes(bytes(1 << 20)) and d / "zero.img",
            "no partition table",
        ),
        (lambda d: gpt_disk(d / "linux.img", LINUX_DATA), "no EFI System Partition"),
    ],
)
def test_validate_bad_disks(tmp_path: Path, make: object, words: str) -> None:
    disk = make(tmp_path)  # type: ignore[operator]
    with pytest.raises(capsa.ConfigError, match=words):
        capsa.UefiBoot(disk).validate()


@needs_ovmf
def test_validate_qcow2_without_esp(tmp_path: Path) -> None:
    raw = gpt_disk(tmp_path / "linux.img", LINUX_DATA)
    qcow2 = tmp_path / "linux.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(qcow2)], check=True, timeout=30)
    with pytest.raises(capsa.ConfigError, match="no EFI System Partition"):
        capsa.UefiBoot(qcow2).validate()


@needs_ovmf
@pytest.mark.skipif(os.geteuid() == 0, reason="root reads and writes any file")
def test_validate_unreadable_and_read_only(esp_disk: Path) -> None:
    esp_disk.chmod(0o444)
    with pytest.raises(capsa.ConfigError, match="not writable"):
        capsa.UefiBoot(esp_disk, writable=True).validate()
    esp_disk.chmod(0)
    with pytest.raises(capsa.ConfigError, match="cannot read"):
        capsa.UefiBoot(esp_disk).validate()


def test_ovmf_missing_names_the_package(
    esp_disk: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fw, "OVMF_DIRS", (tmp_path / "nowhere",))
    monkeypatch.delenv("CAPSA_OVMF_DIR", raising=False)
    with pytest.raises(capsa.ConfigError) as caught:
        capsa.UefiBoot(esp_disk).validate()
    assert "apt-get install ovmf" in str(caught.value)
    with pytest.raises(capsa.ConfigError, match="Secure Boot"):
        capsa.UefiBoot(esp_disk, secure_boot=True).validate()


@needs_ovmf
def test_firmware_vars_size_mismatch(esp_disk: Path, tmp_path: Path) -> None:
    small = tmp_path / "vars.fd"
    shutil.copyfile(OVMF / "OVMF_VARS.fd", small)  # the 2 MiB build's store
    with pytest.raises(capsa.ConfigError, match="not halves of one flash image"):
        capsa.UefiBoot(esp_disk, firmware=OVMF / "OVMF_CODE_4M.fd", vars=small).validate()
    odd = tmp_path / "odd.fd"
    odd.write_bytes(bytes(1000))
    with pytest.raises(capsa.ConfigError, match="not a flash image"):
        capsa.UefiBoot(esp_disk, firmware=odd, vars=small).validate()
    with pytest.raises(capsa.ConfigError, match="is a directory"):
        capsa.UefiBoot(esp_disk, vars=tmp_path).validate()
    with pytest.raises(capsa.ConfigError, match="missing"):
        capsa.UefiBoot(esp_disk, vars=tmp_path / "no" / "vars.fd").validate()


@needs_ovmf
def test_default_and_secure_boot_firmware() -> None:
    plain = fw.find_firmware()
    assert plain.code.name == "OVMF_CODE_4M.fd" and plain.vars_template.name == "OVMF_VARS_4M.fd"
    secure = fw.find_firmware(secure_boot=True)
    assert "secboot" in secure.code.name and secure.vars_template.name == "OVMF_VARS_4M.ms.fd"
    assert plain.flash_bytes == secure.flash_bytes == 4 << 20


# -- per-VM files --


@needs_ovmf
def test_prepare_copies_vars_and_overlays_disk(esp_disk: Path, tmp_path: Path) -> None:
    vm_dir = tmp_path / "vm"
    vm_dir.mkdir()
    before = esp_disk.read_bytes()
    launch = prepare_uefi(capsa.UefiBoot(esp_disk), vm_dir)
    assert (
        launch.vars.parent == vm_dir
        and launch.vars.read_bytes() == (OVMF / "OVMF_VARS_4M.fd").read_bytes()
    )
    assert launch.disk.parent == vm_dir and launch.disk_format == "qcow2"
    info = subprocess.run(
        ["qemu-img", "info", "--output=json", str(launch.disk)],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    assert str(esp_disk.resolve()) in info and '"backing-filename-format": "raw"' in info
    assert esp_disk.read_bytes() == before

    store = tmp_path / "mine.fd"
    kept = prepare_uefi(capsa.UefiBoot(esp_disk, vars=store, writable=True), vm_dir)
    assert kept.vars == store and store.exists() and kept.disk == esp_disk and kept.disk_format == "raw"
    release_uefi(vm_dir)  # what the VM's cleanup does
    store.write_bytes(store.read_bytes()[:-1] + b"\x01")  # "the guest changed a variable"
    again = prepare_uefi(capsa.UefiBoot(esp_disk, vars=store), vm_dir)
    release_uefi(vm_dir)
    assert again.vars.read_bytes()[-1:] == b"\x01"  # the user's store is reused, not re-created


# -- argv --


def test_q35_uefi_argv(esp_disk: Path) -> None:
    launch = UefiLaunch(Path("/fw/code.fd"), Path("/vm/vars.fd"), Path("/vm/disk.qcow2"), "qcow2", False)
    plan = LaunchPlan(qemu="/usr/bin/qemu", accelerator="tcg", console_fd=7, qmp_fd=8, uefi=launch)
    config = capsa.vm(capsa.UefiBoot(esp_disk)).memory_mb(256).config
    argv = build_argv(config, plan)
    joined = " ".join(argv)
    assert "q35,smm=off,pflash0=uefi-code,pflash1=uefi-vars" in argv
    assert "driver=file,node-name=uefi-code,filename=/fw/code.fd,read-only=on" in argv
    assert "driver=file,node-name=uefi-vars,filename=/vm/vars.fd" in argv
    assert "virtio-blk-pci,drive=uefidisk,bootindex=0" in argv
    assert "file=/vm/disk.qcow2" in joined and "format=qcow2" in joined
    assert "-kernel" not in argv and "-append" not in argv
    assert "socket,id=console,fd=7" in argv and "chardev:console" in argv
    secure = build_argv(config, LaunchPlan("/q", "tcg", 7, 8, uefi=replace(launch, secure_boot=True)))
    assert any(a.startswith("q35,smm=on") for a in secure)
    assert "driver=cfi.pflash01,property=secure,value=on" in secure


def test_uefi_argv_needs_prepared_files(esp_disk: Path) -> None:
    config = capsa.vm(capsa.UefiBoot(esp_disk)).config
    with pytest.raises(capsa.ConfigError, match="internal"):
        build_argv(config, LaunchPlan("/q", "tcg", 7, 8))


# -- image builders --


@needs_mtools
def test_efi_app_disk_layout(tmp_path: Path) -> None:
    app = tmp_path / "app.efi"
    app.write_bytes(b"MZ" + os.urandom(100_000))
    disk = efi_app_disk(tmp_path / "out" / "d.img", app, size_mb=48)
    assert disk.stat().st_size == 48 << 20
    table = read_table(disk)
    assert table.scheme == "gpt" and table.esp is not None and table.esp.first_lba == 2048
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    copied = tmp_path / "back.efi"
    subprocess.run(
        ["mcopy", "-i", f"{disk}@@1M", "::/EFI/BOOT/BOOTX64.EFI", str(copied)],
        env=env,
        check=True,
        timeout=30,
    )
    assert copied.read_bytes() == app.read_bytes()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["d.img"]  # no temp files left
    with pytest.raises(capsa.ImageError, match="too small"):
        efi_app_disk(tmp_path / "small.img", app, size_mb=10)


def test_uki_sections(tmp_path: Path) -> None:
    try:
        find_stub()
    except capsa.ImageError:
        pytest.skip("systemd-boot-efi not installed")
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd"
    kernel.write_bytes(os.urandom(300_000))
    initrd.write_bytes(os.urandom(70_000))
    uki = build_uki(kernel, initrd, "console=ttyS0 quiet", tmp_path / "uki.efi")
    listing = subprocess.run(
        ["objdump", "-h", str(uki)], check=False, capture_output=True, text=True, timeout=30
    ).stdout
    sections = {}
    for line in listing.splitlines():
        fields = line.split()
        if len(fields) == 7 and fields[1].startswith("."):
            sections[fields[1]] = (int(fields[2], 16), int(fields[3], 16))
    for name in (".osrel", ".cmdline", ".linux", ".initrd", ".sdmagic"):
        assert name in sections, listing
    spans = sorted((vma, vma + size) for size, vma in sections.values())
    assert all(end <= start for (_, end), (start, _) in itertools.pairwise(spans)), spans
    assert sections[".linux"][0] == 300_000 and sections[".initrd"][0] == 70_000


# -- CLI --


def test_cli_run_uefi_flag_conflicts(esp_disk: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from capsa.cli import main

    assert main(["run", "--uefi", str(esp_disk), "--initrd", "/x/initrd"]) == 2
    assert "--initrd, --root-disk and --cmdline do not apply" in capsys.readouterr().err
    assert main(["run", "--kernel", "/x/vmlinuz", "--uefi-writable"]) == 2
    assert "need --uefi DISK" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: --kernel and --uefi are exclusive
        main(["run", "--kernel", "/x/vmlinuz", "--uefi", str(esp_disk)])


def test_doctor_reports_ovmf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from capsa.cli import doctor

    checks = {c.name: c for c in doctor._uefi()}
    assert set(checks) == {"UEFI firmware (OVMF)", "Secure Boot firmware", "UEFI disk builder"}
    if (OVMF / "OVMF_CODE_4M.fd").is_file():
        assert (
            checks["UEFI firmware (OVMF)"].ok
            and "OVMF_CODE_4M.fd" in checks["UEFI firmware (OVMF)"].detail
        )
    monkeypatch.setattr(fw, "OVMF_DIRS", (tmp_path,))
    monkeypatch.delenv("CAPSA_OVMF_DIR", raising=False)
    missing = {c.name: c for c in doctor._uefi()}
    assert (
        not missing["UEFI firmware (OVMF)"].ok
        and "apt-get install ovmf" in missing["UEFI firmware (OVMF)"].fix
    )
    assert not missing["Secure Boot firmware"].ok


# -- Secure Boot keys, firmware failure detection --


@needs_ovmf
def test_secure_boot_needs_enrolled_keys(esp_disk: Path, tmp_path: Path) -> None:
    capsa.UefiBoot(esp_disk, secure_boot=True).validate()  # the default .ms store has a PK
    plain = tmp_path / "plain-vars.fd"
    shutil.copyfile(OVMF / "OVMF_VARS_4M.fd", plain)
    with pytest.raises(capsa.ConfigError, match="no Secure Boot keys enrolled"):
        capsa.UefiBoot(esp_disk, vars=plain, secure_boot=True).validate()
    capsa.UefiBoot(esp_disk, vars=plain).validate()  # fine without Secure Boot


FIRMWARE_LOG = (
    b'\x1b[2JBdsDxe: loading Boot0001 "UEFI Misc Device" from PciRoot(0x0)/Pci(0x1,0x0)\r\n'
    b'BdsDxe: failed to load Boot0001 "UEFI Misc Device" from PciRoot(0x0)/Pci(0x1,0x0): %s\r\n'
    b'BdsDxe: loading Boot0002 "EFI Internal Shell" from Fv(7CB8)/FvFile(7C04)\r\n'
)


def test_firmware_failure_detection() -> None:
    from capsa.uefi.watch import firmware_failure

    refused = FIRMWARE_LOG % b"Access Denied" + (
        b'BdsDxe: failed to start Boot0002 "EFI Internal Shell" from Fv(7CB8)/FvFile(7C04): '
        b"Security Violation\r\nBdsDxe: No bootable option or device was found.\r\n"
    )
    error = firmware_failure(refused)
    assert error is not None and "Secure Boot refused" in error.message
    assert 'Boot0001 "UEFI Misc Device": Access Denied' in error.message
    missing = firmware_failure(FIRMWARE_LOG % b"Not Found" + b"UEFI Interactive Shell v2.2\r\n")
    assert missing is not None and "BOOTX64.EFI" in (missing.hint or "")
    assert firmware_failure(FIRMWARE_LOG % b"Not Found") is None  # still trying other options
    assert firmware_failure(b"BdsDxe: starting Boot0001 ...\r\nLinux version 6.1\r\n") is None


def test_uefi_refuses_kernel_cmdline(esp_disk: Path) -> None:
    launch = UefiLaunch(Path("/c.fd"), Path("/v.fd"), Path("/d.qcow2"), "qcow2", False)
    config = capsa.vm(capsa.UefiBoot(esp_disk)).cmdline_flag("quiet").config
    with pytest.raises(capsa.ConfigError, match="do not apply"):
        build_argv(config, LaunchPlan("/q", "tcg", 7, 8, uefi=launch))


@needs_ovmf
def test_user_vars_locked_while_in_use(esp_disk: Path, tmp_path: Path) -> None:
    """QEMU does not lock a pflash file: capsa refuses a second VM on the same vars= store."""
    store = tmp_path / "vars.fd"
    first, second = tmp_path / "vm1", tmp_path / "vm2"
    first.mkdir()
    second.mkdir()
    prepare_uefi(capsa.UefiBoot(esp_disk, vars=store), first)
    try:
        with pytest.raises(capsa.ConfigError, match="in use by another running VM"):
            prepare_uefi(capsa.UefiBoot(esp_disk, vars=store), second)
    finally:
        release_uefi(first)
    prepare_uefi(capsa.UefiBoot(esp_disk, vars=store), second)
    release_uefi(second)
    release_uefi(second)  # idempotent


@needs_ovmf
def test_relative_paths_reach_qemu_absolute(
    esp_disk: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative file name like "nbd:host:port" must not reach QEMU as a protocol."""
    monkeypatch.chdir(tmp_path)
    tricky = tmp_path / "nbd:127.0.0.1:10809"
    shutil.copyfile(esp_disk, tricky)
    vm_dir = tmp_path / "vm"
    vm_dir.mkdir()
    launch = prepare_uefi(capsa.UefiBoot(tricky.name, vars="v.fd", writable=True), vm_dir)
    release_uefi(vm_dir)
    assert launch.disk == tricky and launch.vars == tmp_path / "v.fd" and launch.code.is_absolute()


def test_kvm_probe_kernel_comes_from_the_hook_only_when_needed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The VM layer never imports the image layer: ``import capsa`` hands uefi_launch the stock
    kernel's provider, called (a download) only when ``auto`` needs a verdict nobody cached."""
    import asyncio

    from capsa.vm import uefi_launch

    assert uefi_launch._probe_kernel is not None  # set by ``import capsa``
    calls: list[str] = []

    def offline() -> Path:
        calls.append("fetch")
        raise capsa.CapsaError("no network")

    monkeypatch.setattr(uefi_launch, "_probe_kernel", offline)
    monkeypatch.setattr(uefi_launch, "kvm_device_usable", lambda: True)
    monkeypatch.setattr(uefi_launch, "find_qemu", lambda: "qemu-system-x86_64")
    monkeypatch.setattr(uefi_launch, "cached_verdict", lambda qemu: True)
    assert asyncio.run(uefi_launch.uefi_accelerator("auto")) == "kvm"
    assert asyncio.run(uefi_launch.uefi_accelerator("tcg")) == "tcg"
    assert calls == []
    monkeypatch.setattr(uefi_launch, "cached_verdict", lambda qemu: None)
    assert asyncio.run(uefi_launch.uefi_accelerator("auto")) == "tcg"
    assert calls == ["fetch"]
