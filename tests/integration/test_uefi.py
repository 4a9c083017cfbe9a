"""UEFI boot through real OVMF under TCG: images built by capsa.image.uefi_disk, booted by UefiBoot.

Each boot costs ~8 s under TCG (≈5 s of it firmware), so the tests share images and boot VMs in pairs.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import capsa
from capsa import sync
from capsa._paths import cache_dir
from capsa.image.busybox import MODULES
from capsa.image.initramfs import cached_initramfs
from capsa.image.kernels import debian_kernel
from capsa.image.uefi_disk import efi_app_disk, esp_disk, uefi_disk
from capsa.uefi.firmware import find_firmware
from tests.conftest import VMFactory
from tests.guest import READY_MARKER, build_test_guest

pytestmark = [pytest.mark.vm]

READY = "CAPSA-UEFI-READY"
VAR = "/sys/firmware/efi/efivars/CapsaTest-3cbc2d1e-8f5a-4b5e-9d39-7f6a1c2b0e11"
DISK_SECTOR = 75000  # past the ESP (sectors 2048-71679) and before the backup GPT
PROMPT = "# "
INIT = f"""#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in /lib/modules/*.ko; do insmod "$m" 2>/dev/null; done
for ev in /dev/input/event*; do
  (head -c 1 "$ev" >/dev/null 2>&1 && poweroff -f) &
done
mount -t efivarfs efivarfs /sys/firmware/efi/efivars
if [ -e {VAR} ]; then echo CAPSA-VAR-PRESENT; else echo CAPSA-VAR-ABSENT; fi
echo 1 > /proc/sys/kernel/printk
echo {READY}
export PS1='{PROMPT}'
exec setsid cttyhack sh
"""

try:
    find_firmware()
    HAVE_OVMF = True
except capsa.ConfigError:
    HAVE_OVMF = False
if not HAVE_OVMF:
    pytestmark.append(pytest.mark.skip(reason="OVMF not installed (apt-get install ovmf)"))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def uefi_payload() -> tuple[Path, Path]:
    """The Debian cloud kernel (it has the EFI stub) and a busybox initramfs with efivarfs."""
    kernel = debian_kernel()
    initrd = cached_initramfs(
        INIT, cache_dir() / "busybox-guests", "uefi-test", kernel=kernel, modules=(*MODULES, "efivarfs")
    )
    return kernel.path, initrd


@pytest.fixture(scope="module")
def raw_image(tmp_path_factory: pytest.TempPathFactory, uefi_payload: tuple[Path, Path]) -> Path:
    kernel, initrd = uefi_payload
    path = tmp_path_factory.mktemp("uefi") / "disk.img"
    return uefi_disk(
        path, kernel=kernel, initrd=initrd, cmdline="console=ttyS0 panic=-1 quiet", size_mb=40
    )


async def boot_to_prompt(vm: capsa.VM) -> str:
    """Wait for the guest's marker; returns whether it saw the test variable (PRESENT/ABSENT)."""
    index, _ = await vm.console.wait_for_any(["CAPSA-VAR-PRESENT", "CAPSA-VAR-ABSENT"], timeout=120)
    await vm.console.wait_for(READY, timeout=30)
    await vm.console.wait_for(PROMPT, timeout=30)
    return ("PRESENT", "ABSENT")[index]


async def write_var_and_disk(vm: capsa.VM, text: str) -> None:
    """Set a non-volatile UEFI variable from Linux, and write ``text`` to a sector of the disk."""
    console = vm.console
    # Attributes 7: non-volatile, boot-service and runtime access.
    await console.exec_line(f"printf '\\007\\000\\000\\000{text}' > {VAR}", timeout=30)
    assert await console.exec_line(f"cat {VAR} | tail -c {len(text)}", timeout=30) == text
    await console.exec_line(
        f"printf {text} | dd of=/dev/vda bs=512 seek={DISK_SECTOR} conv=sync,fsync 2>/dev/null",
        timeout=30,
    )
    assert await read_sector(vm, len(text)) == text


async def read_sector(vm: capsa.VM, length: int) -> str:
    return await vm.console.exec_line(
        f"dd if=/dev/vda bs=512 skip={DISK_SECTOR} count=1 iflag=direct 2>/dev/null | head -c {length}",
        timeout=30,
    )


@pytest.mark.timeout(240)
@pytest.mark.asyncio
async def test_two_vms_boot_one_image_copy_on_write(
    vm_factory: VMFactory, raw_image: Path, tmp_path: Path
) -> None:
    """Two VMs boot the same raw image at once (one with a NIC, one with a shared directory); each
    writes to its disk and to its own variable store; ACPI stop powers both off; the image is
    byte-for-byte unchanged."""
    before = sha256(raw_image)
    base = capsa.vm(capsa.UefiBoot(raw_image)).memory_mb(384)
    shared = tmp_path / "shared"
    shared.mkdir()
    builders = [base.network(capsa.VirtualNetwork()), base.share(shared, "/mnt/shared")]
    vms = await asyncio.gather(*(vm_factory(builder, timeout=60) for builder in builders))
    assert await asyncio.gather(*(boot_to_prompt(vm) for vm in vms)) == ["ABSENT", "ABSENT"]
    # The NIC and the shared directory's device are on the guest's PCI bus (virtio ids 1af4:1000 /
    # 1041 for the NIC; 1009 (9p) or 105a (virtio-fs) for the share).
    ids = [await vm.console.exec_line("cat /sys/bus/pci/devices/*/device", timeout=30) for vm in vms]
    assert {"0x1000", "0x1041"} & set(ids[0].split()), ids[0]
    assert {"0x1009", "0x105a"} & set(ids[1].split()), ids[1]
    for vm in vms:
        argv = (vm.log_dir / "qemu.argv").read_text()
        assert "q35" in argv and "virtio-blk-pci" in argv and "-kernel" not in argv
    assert vms[0].log_dir.parent != vms[1].log_dir.parent  # each has its own store and overlay
    await asyncio.gather(*(write_var_and_disk(vm, f"vm{i}-wrote") for i, vm in enumerate(vms)))
    await asyncio.gather(*(vm.stop(timeout=30) for vm in vms))
    assert [vm.shutdown_reason for vm in vms] == ["guest-shutdown", "guest-shutdown"]
    assert [vm.exit_code for vm in vms] == [0, 0]
    assert sha256(raw_image) == before


@pytest.mark.timeout(300)
@pytest.mark.asyncio
async def test_vars_persist_with_vars_path_only_and_writable_qcow2(
    vm_factory: VMFactory, tmp_path: Path, uefi_payload: tuple[Path, Path]
) -> None:
    """A qcow2 image booted writable=True with vars=: the variable and the disk write persist. The
    next boot with the same vars= sees the variable (and the disk data through its overlay); a boot
    without vars= at the same time does not see the variable."""
    kernel, initrd = uefi_payload
    image = uefi_disk(
        tmp_path / "disk.qcow2", kernel=kernel, initrd=initrd, cmdline="console=ttyS0 panic=-1 quiet",
        size_mb=40, format="qcow2",
    )  # fmt: skip
    store = tmp_path / "my-vars.fd"
    before = sha256(image)
    first = await vm_factory(
        capsa.vm(capsa.UefiBoot(image, vars=store, writable=True)).memory_mb(384), timeout=60
    )
    assert store.stat().st_size == find_firmware().vars_template.stat().st_size
    assert await boot_to_prompt(first) == "ABSENT"
    await write_var_and_disk(first, "kept-across-boots")
    await first.stop(timeout=30)
    assert first.exit_code == 0
    assert sha256(image) != before  # writable=True: the guest wrote to the user's image
    assert capsa.UefiBoot(image).validate() is None  # still a valid GPT/ESP disk

    with_vars, without = await asyncio.gather(
        vm_factory(capsa.vm(capsa.UefiBoot(image, vars=store)).memory_mb(384), timeout=60),
        vm_factory(capsa.vm(capsa.UefiBoot(image)).memory_mb(384), timeout=60),
    )
    seen = await asyncio.gather(boot_to_prompt(with_vars), boot_to_prompt(without))
    assert seen == ["PRESENT", "ABSENT"]
    assert await read_sector(with_vars, 17) == "kept-across-boots"
    with pytest.raises(capsa.ConfigError, match="in use by another running VM"):
        await capsa.vm(capsa.UefiBoot(image, vars=store)).memory_mb(256).build()
    await with_vars.kill()
    await without.kill()
    assert with_vars.exit_code is not None and with_vars.exit_code < 0  # SIGKILL


@pytest.fixture(scope="module")
def grub_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GRUB EFI application (grub-mkstandalone) whose config prints a marker and halts."""
    mkstandalone = shutil.which("grub-mkstandalone")
    if mkstandalone is None or not Path("/usr/lib/grub/x86_64-efi").is_dir():
        pytest.skip("grub-efi-amd64-bin not installed")
    tmp = tmp_path_factory.mktemp("grub")
    config = tmp / "grub.cfg"
    config.write_text("set timeout=0\necho CAPSA-GRUB-MARKER\nhalt\n")
    app = tmp / "grub.efi"
    subprocess.run(
        [mkstandalone, "-O", "x86_64-efi", "-o", str(app), "--modules=echo halt", "--locales=",
         "--fonts=", "--themes=", f"boot/grub/grub.cfg={config}"],
        check=True, timeout=60,
    )  # fmt: skip
    return efi_app_disk(tmp / "grub.img", app)


@pytest.mark.timeout(120)
def test_non_linux_payload_grub_through_sync_facade(grub_image: Path) -> None:
    """A GRUB EFI application (not Linux) boots through the sync facade, prints its marker and halts
    the machine (QEMU exits 0 by itself)."""
    with sync.vm(capsa.UefiBoot(grub_image)).memory_mb(256).build(timeout=60) as vm:
        vm.console.wait_for("CAPSA-GRUB-MARKER", timeout=90)
        assert vm.wait(timeout=60) == 0
        assert vm.status is capsa.RunState.STOPPED


@pytest.mark.timeout(120)
def test_cli_run_uefi_no_console(grub_image: Path, tmp_path: Path) -> None:
    """``capsa run --uefi DISK --no-console`` boots the disk and exits 0 when the guest powers off;
    a disk without a partition table is refused with exit status 2 and the reason."""
    cli = [sys.executable, "-m", "capsa.cli", "run", "--memory", "256M"]
    done = subprocess.run(
        [*cli, "--uefi", str(grub_image), "--no-console", "--timeout", "90"],
        capture_output=True, text=True, timeout=110, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    blank = tmp_path / "blank.img"
    blank.write_bytes(bytes(1 << 20))
    refused = subprocess.run(
        [*cli, "--uefi", str(blank)], capture_output=True, text=True, timeout=60, check=False
    )
    assert refused.returncode == 2 and "no partition table" in refused.stderr


@pytest.mark.timeout(120)
@pytest.mark.asyncio
async def test_esp_without_boot_file_fails_with_firmware_output(
    vm_factory: VMFactory, tmp_path: Path
) -> None:
    """An ESP whose BOOTX64.EFI is not a loader passes the static checks; when the firmware gives up
    capsa stops the VM and the waiter gets an error naming the failed boot option, with the console
    tail, instead of a hang."""
    app = tmp_path / "not-an-app.efi"
    app.write_bytes(b"MZ" + bytes(4094))  # not a valid PE image: the firmware cannot start it
    image = efi_app_disk(tmp_path / "broken.img", app)
    vm = await vm_factory(capsa.vm(capsa.UefiBoot(image)).memory_mb(256), timeout=60)
    with pytest.raises(capsa.VMExited, match="UEFI firmware could not boot the disk") as caught:
        await vm.console.wait_for("CAPSA-NEVER-PRINTED", timeout=90)
    assert 'Boot0001 "UEFI Misc Device"' in caught.value.message
    assert "BdsDxe: failed to load Boot0001" in caught.value.console_tail
    assert vm.status is capsa.RunState.FAILED


SIGNED_SHIM = Path("/usr/lib/shim/shimx64.efi.signed")
SIGNED_GRUB = Path("/usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed")


@pytest.mark.timeout(240)
@pytest.mark.asyncio
async def test_secure_boot_signed_chain_boots_and_unsigned_uki_is_refused(
    vm_factory: VMFactory, tmp_path: Path, raw_image: Path
) -> None:
    """secure_boot=True: Debian's signed shim + GRUB + cloud kernel boot and the kernel reports
    Secure Boot on; the unsigned UKI capsa builds is refused by the firmware, and the error says so."""
    if not (SIGNED_SHIM.is_file() and SIGNED_GRUB.is_file()):
        pytest.skip("shim-signed / grub-efi-amd64-signed not installed")
    guest = build_test_guest()  # Debian's cloud kernel: signed by Debian, trusted through shim
    config = tmp_path / "grub.cfg"
    config.write_text("set timeout=0\nlinux /vmlinuz console=ttyS0 panic=-1\ninitrd /initrd\nboot\n")
    signed = esp_disk(
        tmp_path / "signed.img",
        {
            "EFI/BOOT/BOOTX64.EFI": SIGNED_SHIM,
            "EFI/BOOT/grubx64.efi": SIGNED_GRUB,
            "EFI/debian/grub.cfg": config,  # where Debian's signed GRUB looks (its built-in prefix)
            "vmlinuz": guest.kernel,
            "initrd": guest.initrd,
        },
    )
    good, bad = await asyncio.gather(
        vm_factory(capsa.vm(capsa.UefiBoot(signed, secure_boot=True)).memory_mb(512), timeout=60),
        vm_factory(capsa.vm(capsa.UefiBoot(raw_image, secure_boot=True)).memory_mb(256), timeout=60),
    )
    text = await good.console.wait_for(READY_MARKER, timeout=180)
    assert "secureboot: Secure boot enabled" in text
    assert "smm=on" in (good.log_dir / "qemu.argv").read_text()
    with pytest.raises(capsa.VMExited, match="Secure Boot refused") as caught:
        await bad.console.wait_for(READY, timeout=180)
    assert "Access Denied" in caught.value.message


@pytest.mark.asyncio
async def test_bad_inputs_refused_before_boot(tmp_path: Path, raw_image: Path) -> None:
    """build() refuses missing, directory and table-less disks and mismatched firmware halves."""
    blank = tmp_path / "blank.img"
    blank.write_bytes(bytes(1 << 20))
    small_vars = tmp_path / "vars-2m.fd"
    shutil.copyfile("/usr/share/OVMF/OVMF_VARS.fd", small_vars)
    code_4m = "/usr/share/OVMF/OVMF_CODE_4M.fd"
    for boot, words in [
        (capsa.UefiBoot(tmp_path / "missing.img"), "not found"),
        (capsa.UefiBoot(tmp_path), "directory"),
        (capsa.UefiBoot(blank), "no partition table"),
        (capsa.UefiBoot(raw_image, firmware=code_4m, vars=small_vars), "not halves of one flash"),
    ]:
        with pytest.raises(capsa.ConfigError, match=words):
            await capsa.vm(boot).build()


@pytest.mark.timeout(240)
def test_uefi_boot_example() -> None:
    """examples/uefi_boot.py builds a UKI disk, boots it and runs a command in the guest."""
    example = Path(__file__).resolve().parents[2] / "examples" / "uefi_boot.py"
    done = subprocess.run(
        [sys.executable, str(example), "cat", "/sys/firmware/efi/fw_platform_size"],
        capture_output=True, text=True, timeout=220, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == "64\n" and "UEFI" in done.stderr
