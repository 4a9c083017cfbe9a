"""Bad input gets a clear CapsaError and leaves nothing behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import capsa
from capsa import _guardian
from tests.conftest import VMFactory
from tests.guest import READY_MARKER, GuestFiles

pytestmark = [pytest.mark.vm]


def _qemu_children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" in cmdline and f"capsa-{pid}-".encode() in cmdline:
            found.append(int(entry.name))
    return found


@pytest.mark.asyncio
async def test_missing_kernel(tmp_path: Path) -> None:
    with pytest.raises(capsa.ConfigError, match="kernel not found"):
        await capsa.vm(capsa.LinuxDirectBoot(tmp_path / "nope")).build()


@pytest.mark.asyncio
async def test_unreadable_initrd(test_guest: GuestFiles, tmp_path: Path) -> None:
    with pytest.raises(capsa.ConfigError, match="initrd not found"):
        await capsa.vm(capsa.LinuxDirectBoot(test_guest.kernel, tmp_path / "missing")).build()
    directory = tmp_path / "a-directory"
    directory.mkdir()
    with pytest.raises(capsa.ConfigError):
        await capsa.vm(capsa.LinuxDirectBoot(test_guest.kernel, directory)).build()


@pytest.mark.asyncio
async def test_not_a_kernel(tmp_path: Path) -> None:
    junk = tmp_path / "vmlinuz"
    junk.write_bytes(b"#!/bin/sh\necho definitely not a kernel\n" * 100)
    with pytest.raises(capsa.ConfigError, match="not a Linux kernel"):
        await capsa.vm(capsa.LinuxDirectBoot(junk)).build()


@pytest.mark.asyncio
async def test_qemu_not_installed(boot: capsa.LinuxDirectBoot, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(capsa.ConfigError, match="qemu-system-x86_64 not found") as info:
        await capsa.vm(boot).accelerator("tcg").build()
    assert "apt-get install qemu-system-x86" in str(info.value)


def test_out_of_range_values(boot: capsa.LinuxDirectBoot) -> None:
    builder = capsa.vm(boot)
    for bad in (0, -1, 65, 2.5, "2", True):
        with pytest.raises(capsa.ConfigError):
            builder.cpus(bad)  # type: ignore[arg-type]
    for bad_mb in (0, 32, 10**9):
        with pytest.raises(capsa.ConfigError):
            builder.memory_mb(bad_mb)
    for key, value in (("console", "tty S0"), ("a b", "1"), ("x", 'q"uote'), ("x", "new\nline")):
        with pytest.raises(capsa.ConfigError):
            builder.cmdline_arg(key, value)
    with pytest.raises(capsa.ConfigError):
        builder.cmdline_override("console=ttyS0\0")
    with pytest.raises(capsa.ConfigError):
        builder.cmdline_override("x" * 5000)
    with pytest.raises(capsa.ConfigError):
        builder.accelerator("hyperv")
    with pytest.raises(capsa.ConfigError):
        builder.disk("/nonexistent/disk.img")


@pytest.mark.asyncio
async def test_qemu_dying_at_start_reports_its_log(boot: capsa.LinuxDirectBoot) -> None:
    # 4 TiB of guest RAM passes our check on no host, so fake an argument QEMU rejects instead.
    builder = capsa.vm(boot).accelerator("tcg")
    config = builder.config
    from dataclasses import replace

    bad = capsa.VMBuilder(replace(config, extra_qemu_args=("-device", "no-such-device")))
    with pytest.raises(capsa.BackendError) as info:
        await bad.build()
    assert "no-such-device" in info.value.qemu_log_tail
    assert not _qemu_children_of(os.getpid())


@pytest.mark.asyncio
async def test_qemu_killed_from_outside_is_reported(vm_factory: VMFactory) -> None:
    vm = await vm_factory()
    await vm.console.wait_for(READY_MARKER, timeout=60)
    assert vm.pid is not None
    os.kill(vm.pid, signal.SIGKILL)
    with pytest.raises(capsa.VMExited) as info:
        await vm.console.wait_for("never", timeout=30)
    assert info.value.exit_code == -signal.SIGKILL
    assert vm.status is capsa.RunState.FAILED
    with pytest.raises(capsa.VMNotRunning):
        await vm.console.write_line("echo hi")


_CHILD = textwrap.dedent(
    """
    import asyncio, sys
    import capsa
    async def main():
        boot = capsa.LinuxDirectBoot(sys.argv[1], sys.argv[2])
        vm = await capsa.vm(boot).build()
        await vm.console.wait_for(sys.argv[3], timeout=90)
        print(vm.pid, vm.log_dir, flush=True)
        await asyncio.sleep(3600)
    asyncio.run(main())
    """
)


@pytest.mark.parametrize("sync_facade", [False, True])
def test_sigkill_of_python_leaves_no_qemu_and_no_temp_dir(
    test_guest: GuestFiles, sync_facade: bool
) -> None:
    code = _CHILD
    if sync_facade:
        code = textwrap.dedent(
            """
            import sys, time
            from capsa import sync, LinuxDirectBoot
            vm = sync.vm(LinuxDirectBoot(sys.argv[1], sys.argv[2])).build()
            vm.console.wait_for(sys.argv[3], timeout=90)
            print(vm._vm.pid, vm.log_dir, flush=True)
            time.sleep(3600)
            """
        )
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(test_guest.kernel), str(test_guest.initrd), READY_MARKER],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline().split()
        assert line, "child failed to boot a VM"
        qemu_pid, log_dir = int(line[0]), Path(line[1])
        assert Path(f"/proc/{qemu_pid}").exists()
        assert log_dir.exists()
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            qemu_alive = (
                Path(f"/proc/{qemu_pid}").exists()
                and b"qemu" in Path(f"/proc/{qemu_pid}/cmdline").read_bytes()
            )
            if not qemu_alive and not log_dir.parent.parent.exists():
                break
            time.sleep(0.1)
        assert not log_dir.exists(), "VM runtime dir survived the host process"
        assert not log_dir.parent.parent.exists(), "process runtime root survived"
        assert (
            not Path(f"/proc/{qemu_pid}/cmdline").exists()
            or b"qemu" not in Path(f"/proc/{qemu_pid}/cmdline").read_bytes()
        ), "QEMU survived the host process"
    finally:
        child.kill()
        child.wait()


def test_guardian_root_is_private_to_this_process() -> None:
    root = _guardian.runtime_root()
    assert root.name.startswith(f"capsa-{os.getpid()}-")
    vm_dir = _guardian.new_vm_dir()
    try:
        assert vm_dir.parent == root
    finally:
        vm_dir.rmdir()
