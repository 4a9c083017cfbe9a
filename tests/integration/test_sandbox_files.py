"""Files through the guest agent: streamed transfer of any size, metadata, directory operations and
the errors each one raises."""

from __future__ import annotations

import hashlib
import os

import pytest

import capsa

pytestmark = [pytest.mark.vm, pytest.mark.asyncio]


async def test_64_mib_round_trip_with_checksum(sandbox: capsa.Sandbox) -> None:
    data = os.urandom(64 << 20)
    await sandbox.agent.write_file("/tmp/a.bin", data, mode=0o600)
    guest_sum = await sandbox.agent.exec("sha256sum").arg("/tmp/a.bin").run()
    assert guest_sum.stdout.split()[0] == hashlib.sha256(data).hexdigest()
    back = await sandbox.agent.read_file("/tmp/a.bin")
    assert back == data
    st = await sandbox.agent.stat("/tmp/a.bin")
    assert (st.type, st.size, st.mode, st.uid) == ("file", 64 << 20, 0o600, 0)


async def test_directory_operations(sandbox: capsa.Sandbox) -> None:
    agent = sandbox.agent
    await agent.mkdir("/tmp/work/a/b", parents=True)
    await agent.mkdir("/tmp/work/a/b", parents=True)  # parents=True: existing is fine
    await agent.write_file("/tmp/work/a/one.txt", "hello")
    await agent.write_file("/tmp/work/a/empty", b"")
    entries = await agent.list_dir("/tmp/work/a")
    assert [(e.name, e.type, e.size) for e in entries] == [
        ("b", "dir", entries[0].size),
        ("empty", "file", 0),
        ("one.txt", "file", 5),
    ]
    assert await agent.read_file("/tmp/work/a/one.txt") == b"hello"
    assert await agent.read_file("/tmp/work/a/empty") == b""
    assert await agent.exists("/tmp/work/a/one.txt") and not await agent.exists("/tmp/work/nope")
    await agent.exec("ln").args(["-s", "/tmp/work/a/one.txt", "/tmp/work/link"]).run()
    link = await agent.stat("/tmp/work/link", follow_symlinks=False)
    assert (link.type, link.target) == ("symlink", "/tmp/work/a/one.txt")
    assert (await agent.stat("/tmp/work/link")).type == "file"
    with pytest.raises(capsa.GuestFileError) as not_empty:
        await agent.remove("/tmp/work/a")
    assert not_empty.value.kind == "not_empty"
    await agent.remove("/tmp/work/link")
    await agent.remove("/tmp/work", recursive=True)
    assert not await agent.exists("/tmp/work")
    names = {e.name for e in await agent.list_dir("/etc")}
    assert {"hostname", "os-release", "passwd"} <= names


async def test_file_errors_name_the_guest_path(sandbox: capsa.Sandbox) -> None:
    agent = sandbox.agent
    with pytest.raises(capsa.GuestFileNotFoundError) as missing:
        await agent.read_file("/no/such/file")
    assert missing.value.path == "/no/such/file" and isinstance(missing.value, capsa.CapsaError)
    with pytest.raises(capsa.GuestFileNotFoundError):
        await agent.write_file("/no/such/dir/file", b"x")
    with pytest.raises(capsa.GuestFileNotFoundError):
        await agent.stat("/no/such/file")
    with pytest.raises(capsa.GuestFileNotFoundError):
        await agent.list_dir("/no/such/dir")
    with pytest.raises(capsa.GuestFileExistsError):
        await agent.mkdir("/tmp")
    with pytest.raises(capsa.GuestFileError) as is_dir:
        await agent.read_file("/tmp")
    assert is_dir.value.kind == "is_a_directory"
    await agent.mkdir("/mnt/ro")
    mounted = await agent.exec("mount").args(["-t", "tmpfs", "-o", "ro", "ro", "/mnt/ro"]).run()
    assert mounted.exit_code == 0, mounted.stderr
    with pytest.raises(capsa.GuestPermissionError) as read_only:
        await agent.write_file("/mnt/ro/file", b"x")
    assert read_only.value.path == "/mnt/ro/file"
    with pytest.raises(capsa.ConfigError):
        await agent.read_file("relative/path")
    assert await agent.exists("/tmp")


async def test_info_describes_the_guest(sandbox: capsa.Sandbox) -> None:
    info = await sandbox.agent.info()
    assert info.kernel_version.startswith("6.1.")
    assert info.hostname.startswith("capsa-")  # each sandbox has its own
    assert info.cpus == 1
    assert 400 << 20 < info.memory_bytes <= 512 << 20
    root = next(m for m in info.mounts if m.target == "/")
    assert root.fstype == "overlay"
    assert info.python_version.startswith("3.11")
    await sandbox.agent.ping()


async def test_disk_usage_is_the_filesystems_statvfs(sandbox: capsa.Sandbox) -> None:
    agent = sandbox.agent
    before = await agent.disk_usage("/")
    df = (await agent.exec("stat").args(["-f", "-c", "%S %b %f", "/"]).run()).stdout.split()
    size, blocks, free = (int(v) for v in df)
    assert before.total == size * blocks > 0
    assert abs(before.used - size * (blocks - free)) <= 1 << 20  # the guest ran a command between
    await agent.write_file("/root/filler", b"x" * (16 << 20))
    after = await agent.disk_usage("/root")
    assert after.used - before.used >= 15 << 20 and after.free == after.total - after.used
    await agent.remove("/root/filler")
    with pytest.raises(capsa.GuestFileError) as missing:
        await agent.disk_usage("/no/such/place")
    assert missing.value.kind == "not_found"
