"""capsa's own kernel (built by the setup script): every device class a sandbox uses works on it,
the stock Debian kernel still works as the fallback, and a kernel missing drivers is reported."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import capsa
from capsa.image.busybox import PROMPT, READY_MARKER, busybox_guest
from capsa.image.kernel import built_kernel
from capsa.image.kernels import GuestKernel, debian_kernel, default_kernel, kernel_build_possible
from capsa.image.sandbox import sandbox_image, sandbox_initramfs
from tests.conftest import SandboxFactory, VMFactory

pytestmark = [pytest.mark.vm, pytest.mark.asyncio]


@pytest.fixture(scope="module")
def capsa_kernel() -> GuestKernel:
    if built_kernel() is None:
        if not kernel_build_possible():
            pytest.skip("no linux-source-6.1 or toolchain here: sandboxes use the stock kernel")
        pytest.fail("capsa's kernel is not built: run capsa kernel build (the setup script does)")
    kernel = default_kernel()
    assert kernel.kind == "capsa"
    return kernel


async def booted(vm_factory: VMFactory, builder: capsa.VMBuilder) -> capsa.VM:
    vm = await vm_factory(builder)
    await vm.console.wait_for(READY_MARKER, timeout=60)
    await vm.console.wait_for(PROMPT, timeout=30)
    return vm


async def test_every_device_class_works(
    capsa_kernel: GuestKernel, vm_factory: VMFactory, tmp_path: Path
) -> None:
    guest = busybox_guest(kernel=capsa_kernel)
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"capsa-disk-marker".ljust(1 << 20, b"\0"))
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "hello.txt").write_text("from the host\n")
    builder = (
        capsa.vm(capsa.LinuxDirectBoot(guest.kernel, guest.initrd))
        .disk(disk, read_only=True)
        .virtio_port("org.capsa.test")
        .qemu_args("-device", "virtio-rng-device")
        .qemu_args("-netdev", "user,id=n0,restrict=on", "-device", "virtio-net-device,netdev=n0")
        .qemu_args("-fsdev", f"local,id=f0,path={shared},security_model=none,readonly=on")
        .qemu_args("-device", "virtio-9p-device,fsdev=f0,mount_tag=share")
    )
    vm = await booted(vm_factory, builder)
    run = vm.console.exec_line
    assert (await run("head -c 17 /dev/vda")).startswith("capsa-disk-marker")
    assert await run("cat /sys/class/virtio-ports/*/name") == "org.capsa.test\n"
    assert "virtio_rng" in await run("cat /sys/class/misc/hw_random/rng_current")
    assert "eth0" in await run("ls /sys/class/net")
    await run("mkdir -p /mnt/share && mount -t 9p -o trans=virtio,version=9p2000.L share /mnt/share")
    assert await run("cat /mnt/share/hello.txt") == "from the host\n"
    filesystems = await run("cat /proc/filesystems")
    for fs in ("squashfs", "erofs", "overlay", "ext4", "9p", "virtiofs", "fuse", "tmpfs"):
        assert fs in filesystems, fs
    assert await run("ls /lib/modules 2>/dev/null | wc -l") == "0\n"  # nothing to load: all built in
    started = time.monotonic()
    await vm.stop(timeout=20)
    assert vm.shutdown_reason == "guest-shutdown"  # the ACPI power button works
    assert time.monotonic() - started < 10


async def test_q35_with_virtio_pci(
    capsa_kernel: GuestKernel, vm_factory: VMFactory, tmp_path: Path
) -> None:
    guest = busybox_guest(kernel=capsa_kernel)
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"pci-disk".ljust(1 << 20, b"\0"))
    builder = capsa.vm(capsa.LinuxDirectBoot(guest.kernel, guest.initrd)).machine("q35").disk(disk)
    vm = await booted(vm_factory, builder)
    assert (await vm.console.exec_line("head -c 8 /dev/vda")) == "pci-disk"


async def test_sandbox_defaults_to_capsas_kernel(
    capsa_kernel: GuestKernel, sandbox: capsa.Sandbox
) -> None:
    info = await sandbox.agent.info()
    assert info.kernel_version == capsa_kernel.release
    assert sandbox_image().kernel_kind == "capsa"


async def test_stock_debian_kernel_still_works_as_fallback(
    sandbox_factory: SandboxFactory, tmp_path: Path
) -> None:
    stock = debian_kernel()
    initrd = sandbox_initramfs(stock, tmp_path)
    vm = await sandbox_factory(capsa.sandbox().kernel(stock.path).initrd(initrd))
    info = await vm.agent.info()
    assert info.kernel_version == stock.release
    assert (await vm.agent.exec("true").run()).exit_code == 0


async def test_kernel_without_drivers_is_reported(
    capsa_kernel: GuestKernel, sandbox_factory: SandboxFactory
) -> None:
    # capsa's initramfs carries no modules for it, so the stock kernel finds no virtio-blk driver.
    image = sandbox_image()
    with pytest.raises(capsa.VMExited, match=r"failed to start: no root disk /dev/vda \(virtio-blk"):
        await sandbox_factory(
            capsa.sandbox().kernel(debian_kernel().path).initrd(image.initrd), timeout=90
        )
