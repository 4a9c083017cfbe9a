"""Volumes on real guests: data outlives the sandbox, the size limit is the guest's ENOSPC, one
read-write mounter at a time (read-only by many), removal refused while mounted, a paused (snapshot)
sandbox keeps its volume."""

from __future__ import annotations

from pathlib import Path

import pytest

import capsa
from capsa.volume import VolumeStore
from tests.conftest import SandboxFactory

pytestmark = [pytest.mark.vm]


async def sh(vm: capsa.Sandbox, script: str, timeout: float = 90) -> capsa.ExecResult:
    return await vm.agent.exec("sh").args(["-c", script]).timeout(timeout).run()


@pytest.mark.asyncio
@pytest.mark.timeout(300)
async def test_data_outlives_the_sandbox(tmp_path: Path, sandbox_factory: SandboxFactory) -> None:
    vol = capsa.volume("notes", size_mb=32, root=tmp_path)
    first = await sandbox_factory(capsa.sandbox().volume(vol, "/data"))
    await first.agent.write_file("/data/hello.txt", b"kept\n")
    done = await sh(first, "mkdir -p /data/d && echo x > /data/d/y && sync && df -m /data | tail -1")
    assert done.exit_code == 0, done.stderr
    assert "/data" in done.stdout
    # A second read-write mounter is refused while the first runs, with a clear error.
    with pytest.raises(capsa.VolumeError, match="mounted by a running sandbox"):
        await capsa.sandbox().volume(vol, "/data").build(120)
    with pytest.raises(capsa.VolumeError, match="mounted"):
        VolumeStore(tmp_path).remove("notes")
    await first.stop()
    second = await sandbox_factory(capsa.sandbox().volume(capsa.volume("notes", root=tmp_path), "/data"))
    assert await second.agent.read_file("/data/hello.txt") == b"kept\n"
    assert (await sh(second, "cat /data/d/y")).stdout == "x\n"
    with pytest.raises(capsa.VolumeError, match="cannot be forked"):
        await second.fork()
    await second.stop()
    VolumeStore(tmp_path).remove("notes")
    assert not (tmp_path / "notes.ext4").exists()


@pytest.mark.asyncio
@pytest.mark.timeout(300)
async def test_size_limit_is_enospc_in_the_guest(
    tmp_path: Path, sandbox_factory: SandboxFactory
) -> None:
    vol = capsa.volume("small", size_mb=16, root=tmp_path)
    vm = await sandbox_factory(capsa.sandbox().volume(vol, "/data"))
    fill = await sh(vm, "dd if=/dev/zero of=/data/big bs=1M count=64 2>&1; echo rc=$?; sync")
    assert "No space left on device" in fill.stdout, fill.stdout
    assert "rc=0" not in fill.stdout
    # The image never grew: preallocated, fixed size; the host gave the guest nothing more.
    assert vol.path.stat().st_size == 16 << 20
    assert vol.path.stat().st_blocks * 512 <= (16 << 20) + (1 << 20)
    # The guest is fine and can free space again.
    again = await sh(vm, "rm /data/big && echo ok > /data/after && cat /data/after")
    assert again.stdout == "ok\n", again.stderr


@pytest.mark.asyncio
@pytest.mark.timeout(300)
async def test_read_only_by_many(tmp_path: Path, sandbox_factory: SandboxFactory) -> None:
    vol = capsa.volume("shared", size_mb=16, root=tmp_path)
    writer = await sandbox_factory(capsa.sandbox().volume(vol, "/data"))
    await writer.agent.write_file("/data/f", b"v1")
    await writer.stop()
    readers = [
        await sandbox_factory(capsa.sandbox().volume(vol, "/v", read_only=True)) for _ in range(2)
    ]
    for reader in readers:
        assert await reader.agent.read_file("/v/f") == b"v1"
        attempt = await sh(reader, "echo x > /v/g; echo rc=$?")
        assert "rc=0" not in attempt.stdout
    with pytest.raises(capsa.VolumeError, match="mounted"):
        await capsa.sandbox().volume(vol, "/data").build(120)


@pytest.mark.asyncio
@pytest.mark.timeout(300)
async def test_snapshot_and_restore_keep_the_volume(
    tmp_path: Path, sandbox_factory: SandboxFactory
) -> None:
    """A pause (snapshot, stop, restore) keeps the volume mounted with what was written."""
    vol = capsa.volume("paused", size_mb=16, root=tmp_path)
    vm = await sandbox_factory(capsa.sandbox().volume(vol, "/data"))
    await vm.agent.write_file("/data/before", b"1")
    running_on = await vm.snapshot(tmp_path / "running-on")
    # While the original runs, the snapshot cannot be restored: the volume is taken.
    with pytest.raises(capsa.VolumeError):
        await capsa.sandbox().from_snapshot(running_on).build(120)
    await vm.agent.write_file("/data/later", b"x")
    assert (await sh(vm, "sync")).exit_code == 0
    paused = await vm.snapshot(tmp_path / "paused", resume=False)  # a pause: frozen, then stopped
    await vm.kill()
    # The first snapshot's kernel never saw "later": restoring it would corrupt the volume.
    with pytest.raises(capsa.SnapshotError, match="written since the snapshot"):
        await capsa.sandbox().from_snapshot(running_on).build(120)
    restored = await sandbox_factory(capsa.sandbox().from_snapshot(paused))
    assert await restored.agent.read_file("/data/before") == b"1"
    await restored.agent.write_file("/data/after", b"2")
    listing = (await sh(restored, "sync && ls /data")).stdout.split()
    assert listing == ["after", "before", "later", "lost+found"]
