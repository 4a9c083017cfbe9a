"""The default sandbox image (Debian rootfs on SquashFS under a tmpfs overlay) boots and is clean."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

import capsa
from capsa.errors import ImageError
from capsa.image import rootfs
from capsa.image.sandbox import INIT_ERROR_MARKER, ROOT_READY_MARKER, SandboxImage, sandbox_image
from tests.conftest import SandboxFactory, VMFactory

pytestmark = [pytest.mark.vm]


@pytest.fixture(scope="session")
def image() -> SandboxImage:
    return sandbox_image()


@pytest.mark.asyncio
async def test_debian_userland_with_python_and_msgpack(sandbox: capsa.Sandbox) -> None:
    script = "import msgpack, sys; print(sys.version_info[:2])"
    assert (await sandbox.agent.exec("python3").args(["-c", script]).run()).stdout == "(3, 11)\n"
    assert re.fullmatch(r"capsa-[0-9a-f]{6}\n", (await sandbox.agent.exec("hostname").run()).stdout)
    os_release = await sandbox.agent.read_file("/etc/os-release")
    assert b'PRETTY_NAME="Debian GNU/Linux 12' in os_release


@pytest.mark.asyncio
async def test_each_sandbox_starts_clean(sandbox_factory: SandboxFactory, image: SandboxImage) -> None:
    before = image.rootfs.stat().st_mtime_ns
    first = await sandbox_factory()
    await first.agent.write_file("/etc/leftover", b"dirty")
    await first.agent.remove("/bin/ls")
    assert await first.agent.read_file("/etc/leftover") == b"dirty"
    # The root disk is read-only even for guest root writing to the raw device.
    refused = await first.agent.exec("dd").args(["if=/dev/zero", "of=/dev/vda", "count=1"]).run()
    assert refused.exit_code == 1
    await first.stop(timeout=10)
    second = await sandbox_factory()
    assert not await second.agent.exists("/etc/leftover")
    assert (await second.agent.stat("/bin/ls")).type == "file"
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
