"""Filesystem snapshots (``capsa.sandbox.files_snapshot``) on real guests: the files a sandbox
changed go into a freshly booted one; processes and the boot do not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import capsa
from capsa.sandbox.files_snapshot import ARCHIVE, MANIFEST, FilesSnapshot, restore_files, save_files
from tests.conftest import SandboxFactory

pytestmark = [pytest.mark.vm, pytest.mark.asyncio]


async def sh(vm: capsa.Sandbox, script: str) -> str:
    result = await vm.agent.exec("sh").args(["-c", script]).timeout(60).run()
    assert result.exit_code == 0, result.stderr
    return result.stdout


@pytest.mark.timeout(240)
async def test_files_snapshot_restores_files_deletions_and_links_into_a_fresh_boot(
    tmp_path: Path, sandbox_factory: SandboxFactory
) -> None:
    vm = await sandbox_factory()
    await sh(
        vm,
        "mkdir -p /home/user/d/sub && printf kept > /home/user/d/sub/f.txt && chmod 640 "
        "/home/user/d/sub/f.txt && ln -s sub/f.txt /home/user/d/link && ln /home/user/d/sub/f.txt "
        "/home/user/d/hard && rm /etc/issue && rm -rf /usr/share/doc && mkdir /usr/share/doc && "
        "echo new > /usr/share/doc/only && mkfifo /home/user/d/fifo && "
        "setfattr -n trusted.e2b.k -v v1 /home/user/d/sub/f.txt 2>/dev/null; "
        "sleep 1000 >/dev/null 2>&1 &",
    )
    boot = await sh(vm, "cat /proc/sys/kernel/random/boot_id")
    snap = await save_files(vm, tmp_path / "fs")
    assert {p.name for p in (tmp_path / "fs").iterdir()} == {ARCHIVE, MANIFEST}
    assert "etc/issue" in snap.removed and "usr/share/doc" in snap.removed  # whiteout, opaque dir
    manifest = json.loads((tmp_path / "fs" / MANIFEST).read_text())
    assert manifest["entries"] == snap.entries > 0
    assert snap.size < 4 << 20  # the changes, not the image
    await vm.kill()

    fresh = await capsa.sandbox().cold().build()
    try:
        await restore_files(fresh, FilesSnapshot.open(tmp_path / "fs"))
        out = await sh(
            fresh,
            "cat /home/user/d/sub/f.txt; echo; stat -c %a /home/user/d/sub/f.txt; "
            "readlink /home/user/d/link; stat -c %h /home/user/d/hard; test -p /home/user/d/fifo "
            "&& echo fifo; test -e /etc/issue || echo no-issue; ls /usr/share/doc; "
            "cat /proc/sys/kernel/random/boot_id; pgrep -f 'sleep 1000' || echo no-sleep",
        )
        lines = out.split("\n")
        assert lines[:7] == ["kept", "640", "sub/f.txt", "2", "fifo", "no-issue", "only"]
        assert lines[7] != boot.strip()  # a new boot
        assert lines[8] == "no-sleep"  # no process came along
        assert await fresh.agent.read_file("/usr/lib/capsa/capsa-agent")  # the new agent is in place
    finally:
        await fresh.kill()
