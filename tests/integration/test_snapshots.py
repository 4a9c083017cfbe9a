"""Snapshots on real guests: restore, fork, the template cache, pools and bad snapshots."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

import capsa
from capsa.accelerator import resolve_accelerator
from capsa.backend.qemu.process import find_qemu
from capsa.sandbox.builder import template_root
from capsa.snapshot import migration
from capsa.snapshot.store import config_key, config_record
from tests.conftest import SandboxFactory

pytestmark = [pytest.mark.vm, pytest.mark.asyncio]


async def sh(vm: capsa.Sandbox, script: str) -> str:
    result = await vm.agent.exec("sh").args(["-c", script]).timeout(60).run()
    assert result.exit_code == 0, result.stderr
    return result.stdout


async def test_restore_brings_back_files_and_a_working_agent(
    tmp_path: Path, sandbox_factory: SandboxFactory
) -> None:
    vm = await sandbox_factory()
    await vm.agent.write_file("/tmp/before.txt", b"written before the snapshot")
    snap = await vm.snapshot(tmp_path / "snap")
    assert (tmp_path / "snap" / "state").stat().st_size < 1 << 20  # devices only: RAM is apart
    memory = (tmp_path / "snap" / "memory").stat()
    assert memory.st_size == 512 << 20 and 8 << 20 < memory.st_blocks * 512 < 256 << 20  # sparse
    assert sorted(p.name for p in (tmp_path / "snap").iterdir()) == ["memory", "snapshot.json", "state"]
    await vm.agent.write_file("/tmp/after.txt", b"the original keeps running")  # not paused
    started = time.monotonic()
    restored = await sandbox_factory(capsa.sandbox().from_snapshot(snap))
    assert time.monotonic() - started < 10
    assert await restored.agent.read_file("/tmp/before.txt") == b"written before the snapshot"
    assert not await restored.agent.exists("/tmp/after.txt")
    assert (await restored.agent.exec("python3").args(["-c", "print(6 * 7)"]).run()).stdout == "42\n"
    clock = float(await sh(restored, "date +%s.%N"))
    assert abs(clock - time.time()) < 5  # the guest clock was corrected, not left at snapshot time


async def test_forks_diverge_and_have_their_own_identity(sandbox_factory: SandboxFactory) -> None:
    vm = await sandbox_factory()
    await vm.agent.write_file("/tmp/shared.txt", b"common ancestor")
    first, second = await vm.fork(2)
    try:
        for clone in (first, second):
            assert await clone.agent.read_file("/tmp/shared.txt") == b"common ancestor"
        await first.agent.write_file("/tmp/mine.txt", b"first")
        await second.agent.write_file("/tmp/mine.txt", b"second")
        assert await first.agent.read_file("/tmp/mine.txt") == b"first"
        assert await second.agent.read_file("/tmp/mine.txt") == b"second"
        assert not await vm.agent.exists("/tmp/mine.txt")
        rand = "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'"
        randoms = {await sh(clone, rand) for clone in (vm, first, second)}
        assert len(randoms) == 3
        py_rand = "import random, os; print(random.random(), os.urandom(8).hex())"
        outs = {
            (await c.agent.exec("python3").args(["-c", py_rand]).run()).stdout for c in (first, second)
        }
        assert len(outs) == 2
        hostnames = {(await c.agent.info()).hostname for c in (vm, first, second)}
        assert len(hostnames) == 3
    finally:
        for clone in (first, second):
            await clone.kill()


async def test_second_build_restores_the_template(sandbox_factory: SandboxFactory) -> None:
    first = await sandbox_factory()  # cold the first time this configuration is seen
    second = await sandbox_factory()
    assert second.ready_seconds is not None and second.ready_seconds < 2.0
    assert (await second.agent.exec("true").run()).exit_code == 0
    assert any(template_root().iterdir())
    cold = await sandbox_factory(capsa.sandbox().cold())
    assert cold.ready_seconds is not None and cold.ready_seconds > second.ready_seconds
    assert (await first.agent.info()).hostname != (await second.agent.info()).hostname


async def test_bad_snapshots_are_refused_cleanly(
    tmp_path: Path, sandbox_factory: SandboxFactory
) -> None:
    with pytest.raises(capsa.SnapshotError, match="no snapshot"):
        await capsa.sandbox().from_snapshot(tmp_path / "missing").build()
    vm = await sandbox_factory()
    snap = await vm.snapshot(tmp_path / "good")
    with pytest.raises(capsa.SnapshotError, match="already exists"):
        await vm.snapshot(tmp_path / "good")

    truncated = tmp_path / "truncated"
    shutil.copytree(snap.path, truncated)
    with (truncated / "state").open("r+b") as fh:
        fh.truncate((truncated / "state").stat().st_size // 2)
    with pytest.raises(capsa.SnapshotError):
        await capsa.sandbox().from_snapshot(truncated).build(timeout=60)

    short_memory = tmp_path / "short-memory"
    shutil.copytree(snap.path, short_memory)
    with (short_memory / "memory").open("r+b") as fh:
        fh.truncate(1 << 20)
    with pytest.raises(capsa.SnapshotError, match="memory image"):
        await capsa.sandbox().from_snapshot(short_memory).build(timeout=60)

    other_qemu = tmp_path / "other-qemu"
    shutil.copytree(snap.path, other_qemu)
    meta = json.loads((other_qemu / "snapshot.json").read_text())
    meta["record"]["qemu"][2] += 1  # as if QEMU had been upgraded since
    (other_qemu / "snapshot.json").write_text(json.dumps(meta))
    with pytest.raises(capsa.SnapshotError, match="another QEMU build"):
        await capsa.sandbox().from_snapshot(other_qemu).build()

    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "snapshot.json").write_text("{not json")
    with pytest.raises(capsa.SnapshotError, match="unreadable"):
        await capsa.sandbox().from_snapshot(garbage).build()
    assert (await vm.agent.exec("true").run()).exit_code == 0  # the source is unharmed


async def test_disk_full_while_saving_leaves_nothing(
    tmp_path: Path, sandbox_factory: SandboxFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    vm = await sandbox_factory()
    monkeypatch.setattr(migration, "open_for_write", lambda path: os.open("/dev/full", os.O_WRONLY))
    with pytest.raises(capsa.SnapshotError, match="saving the VM state failed"):
        await vm.snapshot(tmp_path / "snap")
    assert list(tmp_path.iterdir()) == []  # no partial snapshot
    assert (await vm.agent.exec("true").run()).exit_code == 0  # and the VM runs on


async def test_shares_and_snapshots_do_not_mix(tmp_path: Path, sandbox_factory: SandboxFactory) -> None:
    vm = await sandbox_factory(capsa.sandbox().share(tmp_path, "/mnt/x"))
    with pytest.raises(capsa.SnapshotError, match="shared directories"):
        await vm.snapshot(tmp_path / "snap")


async def test_pool_reserve_release_refill_and_concurrency() -> None:
    with pytest.raises(capsa.ConfigError):
        await capsa.pool(capsa.sandbox(), size=0)
    async with await capsa.pool(capsa.sandbox().memory_mb(256), size=2) as pool:
        deadline = time.monotonic() + 120
        while pool.available < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert pool.available == 2
        async with pool.reserve(timeout=10) as vm:
            assert (await vm.agent.exec("true").run()).exit_code == 0
        assert vm.status is capsa.RunState.STOPPED  # released sandboxes are destroyed

        async def use(i: int) -> str:
            async with pool.reserve(timeout=60) as sb:
                return (await sb.agent.exec("echo").arg(str(i)).run()).stdout

        assert sorted(await asyncio.gather(*(use(i) for i in range(4)))) == [f"{i}\n" for i in range(4)]
        grabbed = pool.try_reserve()
        if grabbed is not None:
            await grabbed.kill()
        while pool.available < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert pool.available == 2  # refilled
    with pytest.raises(capsa.VMNotRunning):
        pool.try_reserve()


async def test_9p_shares_are_mounted_after_a_template_restore(
    tmp_path: Path, sandbox_factory: SandboxFactory
) -> None:
    def builder(name: str) -> capsa.SandboxBuilder:
        host = tmp_path / name
        host.mkdir()
        (host / "who.txt").write_text(f"{name}\n")
        return (
            capsa.sandbox()
            .share(host, "/mnt/in", capsa.AccessMode.READ_ONLY, mechanism="9p")
            .share(tmp_path, "/mnt/all", capsa.AccessMode.READ_WRITE, mechanism="9p")
        )

    first_builder = builder("first")
    config = await first_builder.vm_config()
    accelerator = await resolve_accelerator(config.accelerator, config.boot.kernel)  # type: ignore[attr-defined]
    shutil.rmtree(template_root() / config_key(config_record(config, find_qemu(), accelerator)), True)
    first = await sandbox_factory(first_builder)  # cold, records the template before mounting
    second = await sandbox_factory(builder("second"))  # restored: the slots get other directories
    assert second.ready_seconds is not None and second.ready_seconds < (first.ready_seconds or 0)
    assert await first.agent.read_file("/mnt/in/who.txt") == b"first\n"
    assert await second.agent.read_file("/mnt/in/who.txt") == b"second\n"
    with pytest.raises(capsa.GuestPermissionError):
        await second.agent.write_file("/mnt/in/x", b"read-only on the host")
    await second.agent.write_file("/mnt/all/from-second.txt", b"rw works")
    assert (tmp_path / "from-second.txt").read_bytes() == b"rw works"
    with pytest.raises(capsa.SnapshotError, match="mounted shared directories"):
        await second.snapshot(tmp_path / "snap")


async def test_pool_surfaces_restore_failures_and_keeps_serving(
    tmp_path: Path, sandbox_factory: SandboxFactory
) -> None:
    vm = await sandbox_factory()
    good = await vm.snapshot(tmp_path / "good")
    bad = tmp_path / "bad"
    shutil.copytree(good.path, bad)
    with (bad / "state").open("r+b") as fh:  # QEMU itself fails to load it: a real failed restore
        fh.truncate((bad / "state").stat().st_size // 2)
    async with await capsa.pool(capsa.sandbox().from_snapshot(bad), size=1) as pool:
        with pytest.raises(capsa.CapsaTimeoutError, match="last build error"):
            await pool.take(timeout=4)
        assert isinstance(pool.last_error, capsa.SnapshotError)
        shutil.rmtree(bad)
        shutil.copytree(good.path, bad)  # repaired: the pool's retries pick it up
        async with pool.reserve(timeout=60) as sb:
            assert (await sb.agent.exec("true").run()).exit_code == 0


async def test_snapshot_without_room_in_ram_works_on_disk(
    tmp_path: Path, sandbox_factory: SandboxFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A small /dev/shm (containers mount 64 MiB): the image is made next to the snapshot instead."""
    import importlib

    handle = importlib.import_module("capsa.sandbox.handle")
    vm = await sandbox_factory()
    monkeypatch.setattr(handle, "free_bytes", lambda path: 0)
    snap = await vm.snapshot(tmp_path / "snap")
    assert sorted(p.name for p in snap.path.iterdir()) == ["memory", "snapshot.json", "state"]
    restored = await sandbox_factory(capsa.sandbox().from_snapshot(snap))
    assert (await restored.agent.exec("true").run()).exit_code == 0


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> object:
    """A 2 MiB tmpfs (the tests run as root): room for a state file, not for a memory image."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=True, timeout=30
    )
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False, timeout=30)


@pytest.mark.parametrize("splitter", ["in-process", "helper"])
async def test_snapshot_to_a_full_filesystem_raises_snapshot_error(
    tiny_tmpfs: Path,
    sandbox_factory: SandboxFactory,
    monkeypatch: pytest.MonkeyPatch,
    splitter: str,
) -> None:
    """A real ENOSPC (not /dev/full) in every on-disk stage is a SnapshotError, never a bare OSError,
    and leaves no partial snapshot; the sandbox runs on. ``helper`` forces the helper-QEMU split."""
    import importlib

    memory = importlib.import_module("capsa.snapshot.memory")
    if splitter == "helper":

        def unsupported(*args: object) -> int:
            raise memory.UnsupportedStream("forced by the test")

        monkeypatch.setattr(memory, "split_stream", unsupported)
    vm = await sandbox_factory()
    with pytest.raises(capsa.SnapshotError) as raised:
        await vm.snapshot(tiny_tmpfs / "snap")
    assert "No space left" in raised.value.message or "space" in (raised.value.hint or "")
    assert list(tiny_tmpfs.iterdir()) == []  # no partial snapshot
    assert (await vm.agent.exec("true").run()).exit_code == 0
