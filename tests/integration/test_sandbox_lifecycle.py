"""Sandbox lifecycle: zero-config build, clean shutdown, crashes and bad images reported, the sync
facade, and no leftovers."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

import capsa
from capsa import sync
from tests.conftest import SandboxFactory

pytestmark = [pytest.mark.vm]


@pytest.mark.asyncio
async def test_async_with_builds_runs_and_powers_off_cleanly() -> None:
    async with await capsa.sandbox().cpus(1).memory_mb(512).no_network().build() as vm:
        assert vm.status is capsa.RunState.RUNNING
        log_dir = vm.log_dir
        r = await vm.agent.exec("ls").arg("/").run()
        assert r.exit_code == 0
    assert vm.status is capsa.RunState.STOPPED
    assert vm.shutdown_reason == "guest-shutdown"  # the agent powered off; no kill was needed
    assert vm.exit_code == 0
    assert not log_dir.exists()
    with pytest.raises(capsa.VMNotRunning):
        await vm.agent.ping()


@pytest.mark.asyncio
async def test_after_shutdown_every_call_raises_vm_not_running(sandbox_factory: SandboxFactory) -> None:
    vm = await sandbox_factory()
    await vm.agent.shutdown()
    assert await vm.wait(timeout=30) == 0
    for call in (vm.agent.ping(), vm.agent.exec("true").run(), vm.agent.read_file("/etc/hostname")):
        with pytest.raises(capsa.VMNotRunning):
            await call


@pytest.mark.asyncio
async def test_guest_crash_fails_pending_calls_with_the_console_tail(
    sandbox_factory: SandboxFactory,
) -> None:
    vm = await sandbox_factory()
    sleeper = await vm.agent.exec("sleep").arg("60").spawn()
    crash = "echo 1 > /proc/sys/kernel/sysrq; echo c > /proc/sysrq-trigger"
    await vm.agent.exec("sh").args(["-c", crash]).spawn()
    with pytest.raises(capsa.VMExited) as info:
        await asyncio.wait_for(sleeper.wait(), 60)
    tail = info.value.console_tail
    assert "Kernel Offset" in tail or "panic" in tail.lower() or "sysrq" in tail.lower(), tail
    assert "guest-reset" in str(info.value)  # panic=-1: the crashed kernel reset, QEMU exited
    with pytest.raises(capsa.VMNotRunning):
        await vm.agent.ping()


@pytest.mark.asyncio
async def test_qemu_killed_from_outside_is_reported(sandbox_factory: SandboxFactory) -> None:
    vm = await sandbox_factory()
    running = await vm.agent.exec("sleep").arg("60").spawn()
    assert vm.pid is not None
    os.kill(vm.pid, signal.SIGKILL)
    with pytest.raises(capsa.VMExited):
        await asyncio.wait_for(running.wait(), 30)


@pytest.mark.asyncio
async def test_bad_rootfs_is_reported_not_hung(tmp_path: Path, sandbox_factory: SandboxFactory) -> None:
    bogus = tmp_path / "rootfs.img"
    bogus.write_bytes(b"\0" * (1 << 20))
    with pytest.raises(capsa.VMExited, match="failed to start: cannot mount the squashfs root"):
        await sandbox_factory(capsa.sandbox().rootfs(bogus), timeout=90)


@pytest.mark.asyncio
async def test_initrd_without_agent_times_out_with_console_tail(sandbox_factory: SandboxFactory) -> None:
    from tests.guest import READY_MARKER, build_test_guest

    busybox = build_test_guest()
    with pytest.raises(capsa.StartTimeoutError) as info:
        await sandbox_factory(capsa.sandbox().initrd(busybox.initrd), timeout=15)
    assert READY_MARKER in info.value.console_tail


def test_sync_facade_has_the_same_names() -> None:
    with sync.sandbox().memory_mb(512).build() as vm:
        r = vm.agent.exec("sh").args(["-c", "echo $X; exit 4"]).env("X", "sync").run()
        assert (r.exit_code, r.stdout) == (4, "sync\n")
        vm.agent.write_file("/tmp/s.txt", b"sync data")
        assert vm.agent.read_file("/tmp/s.txt") == b"sync data"
        assert [e.name for e in vm.agent.list_dir("/tmp")] == ["s.txt"]
        p = vm.agent.exec("sh").args(["-c", "echo a; sleep 0.2; echo b"]).spawn()
        assert b"".join(p.stdout) == b"a\nb\n"
        assert p.wait(timeout=10) == 0
        assert vm.agent.info().hostname.startswith("capsa-")
        vm.agent.ping()
    assert vm.status is capsa.RunState.STOPPED


def test_sync_snapshot_fork_and_restore(tmp_path: Path) -> None:
    from capsa import sync

    with sync.sandbox().build() as vm:
        vm.agent.write_file("/tmp/sync.txt", b"sync state")
        snap = vm.snapshot(tmp_path / "snap")
        [clone] = vm.fork(1)
        with clone:
            assert clone.agent.read_file("/tmp/sync.txt") == b"sync state"
        with sync.sandbox().from_snapshot(snap).build() as restored:
            assert restored.agent.read_file("/tmp/sync.txt") == b"sync state"
