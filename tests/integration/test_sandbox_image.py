"""The default sandbox image (Debian rootfs on SquashFS under a tmpfs overlay) boots and is clean."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import capsa
from capsa.errors import ImageError
from capsa.image import rootfs
from capsa.image.sandbox import INIT_ERROR_MARKER, ROOT_READY_MARKER, SandboxImage, sandbox_image
from tests.conftest import VMFactory

pytestmark = [pytest.mark.vm]


@pytest.fixture(scope="session")
def image() -> SandboxImage:
    return sandbox_image()


def boot_of(image: SandboxImage) -> capsa.LinuxDirectBoot:
    return capsa.LinuxDirectBoot(image.kernel, image.initrd).with_root_disk(image.rootfs, read_only=True)


async def booted(vm_factory: VMFactory, image: SandboxImage) -> capsa.VM:
    vm = await vm_factory(capsa.vm(boot_of(image)).cmdline_flag("quiet"))
    await vm.console.wait_for(ROOT_READY_MARKER, timeout=90)
    await vm.console.wait_for("# ", timeout=30)
    return vm


@pytest.mark.asyncio
async def test_debian_userland_with_python_and_msgpack(
    vm_factory: VMFactory, image: SandboxImage
) -> None:
    vm = await booted(vm_factory, image)
    out = await vm.console.exec_line("python3 -c 'import msgpack, sys; print(sys.version_info[:2])'", 90)
    assert out == "(3, 11)\n"
    assert await vm.console.exec_line("hostname") == "capsa\n"
    assert 'PRETTY_NAME="Debian GNU/Linux 12' in await vm.console.exec_line("cat /etc/os-release")


@pytest.mark.asyncio
async def test_each_sandbox_starts_clean(vm_factory: VMFactory, image: SandboxImage) -> None:
    before = image.rootfs.stat().st_mtime_ns
    first = await booted(vm_factory, image)
    await first.console.exec_line("echo dirty > /etc/leftover; rm -f /bin/ls; sync")
    assert await first.console.exec_line("cat /etc/leftover") == "dirty\n"
    # The root disk is read-only even for guest root writing to the raw device.
    refused = await first.console.exec_line("dd if=/dev/zero of=/dev/vda count=1 2>&1; echo rc=$?")
    assert "rc=1" in refused
    await first.stop(timeout=5)
    second = await booted(vm_factory, image)
    assert "No such file" in await second.console.exec_line("cat /etc/leftover 2>&1; true")
    assert await second.console.exec_line("test -x /bin/ls && echo present") == "present\n"
    assert image.rootfs.stat().st_mtime_ns == before


@pytest.mark.asyncio
async def test_kernel_without_root_disk_reports_instead_of_hanging(
    vm_factory: VMFactory, image: SandboxImage
) -> None:
    vm = await vm_factory(capsa.vm(capsa.LinuxDirectBoot(image.kernel, image.initrd)))
    with pytest.raises(capsa.VMExited) as info:
        await vm.console.wait_for(ROOT_READY_MARKER, timeout=90)
    assert f"{INIT_ERROR_MARKER}: no root disk /dev/vda" in info.value.console_tail


def test_missing_build_tools_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ImageError, match="mmdebstrap not found") as info:
        rootfs.build_rootfs(tmp_path / "root.sqfs")
    assert "apt-get install mmdebstrap" in str(info.value)
    assert not list(tmp_path.iterdir())


def test_image_is_cached(image: SandboxImage) -> None:
    again = sandbox_image(build=False)
    assert again == image
    assert os.access(image.rootfs, os.R_OK) and image.rootfs.stat().st_size > 20 << 20
