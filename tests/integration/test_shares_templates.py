"""Sandboxes with shares start from a template: ``auto`` puts shares on 9p, mounted after the restore
(read-only ones with ``cache=loose``), and read-only enforcement, write-through and the escape
checks still hold there. ``mechanism="virtiofs"`` and ``.cold()`` keep booting virtio-fs."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

import capsa
from capsa import AccessMode
from capsa.shares.spec import ShareSpec, for_template
from tests.conftest import SandboxFactory

pytestmark = [pytest.mark.vm]

RESTORED = "sandbox restored from"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """tmp/secret.txt next to tmp/src (read-only share) and tmp/out (read-write share)."""
    (tmp_path / "secret.txt").write_text("host secret\n")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "code.py").write_text("print('from the host')\n")
    (tmp_path / "src" / "to-secret").symlink_to(tmp_path / "secret.txt")  # absolute, made on the host
    (tmp_path / "out").mkdir()
    return tmp_path


async def sh(vm: capsa.Sandbox, script: str) -> capsa.ExecResult:
    return await vm.agent.exec("sh").args(["-c", script]).timeout(60).run()


async def restored(
    builder: capsa.SandboxBuilder, factory: SandboxFactory, caplog: pytest.LogCaptureFixture
) -> capsa.Sandbox:
    """Build twice (the first build may record the template); the second must be a restore."""
    await (await factory(builder)).kill()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="capsa.sandbox.handle"):
        vm = await factory(builder)
    assert RESTORED in caplog.text, "the sandbox with a share booted cold instead of restoring"
    return vm


def test_auto_means_9p_for_templates_and_explicit_choices_stay(tree: Path) -> None:
    ro = ShareSpec(tree / "src", "/mnt/src", AccessMode.READ_ONLY)
    rw = ShareSpec(tree / "out", "/mnt/out", AccessMode.READ_WRITE)
    assert (for_template(ro).mechanism, for_template(ro).guest_cache) == ("9p", "loose")
    assert for_template(rw) == rw  # writable: virtio-fs, cold (see for_template)
    for mechanism in ("virtiofs", "9p"):
        spec = ShareSpec(tree / "src", "/mnt/src", AccessMode.READ_ONLY, mechanism)  # type: ignore[arg-type]
        assert for_template(spec) == spec


@pytest.mark.asyncio
@pytest.mark.timeout(240)
async def test_read_only_share_restores_and_stays_read_only_and_confined(
    tree: Path, sandbox_factory: SandboxFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Attack: guest root remounts the restored read-only share writable and writes, or follows a
    host-made absolute symlink to a file next to the share."""
    builder = capsa.sandbox().memory_mb(384).share(tree / "src", "/mnt/src", AccessMode.READ_ONLY)
    vm = await restored(builder, sandbox_factory, caplog)
    assert [(s.guest_path, s.mechanism) for s in vm.shares] == [("/mnt/src", "9p")]
    mounts = await sh(vm, "grep ' /mnt/src ' /proc/mounts")
    assert " 9p " in mounts.stdout and "loose" in mounts.stdout and "ro," in mounts.stdout
    assert await vm.agent.read_file("/mnt/src/code.py") == b"print('from the host')\n"
    attack = await sh(
        vm,
        "mount -o remount,rw /mnt/src; echo pwned > /mnt/src/code.py; echo new > /mnt/src/new; "
        "rm -f /mnt/src/code.py; cat /mnt/src/to-secret /mnt/src/../secret.txt 2>&1; true",
    )
    assert (tree / "src" / "code.py").read_text() == "print('from the host')\n"
    assert not (tree / "src" / "new").exists()
    assert "host secret" not in attack.stdout
    (tree / "src" / "later.txt").write_text("added on the host\n")  # new host files are seen
    assert await vm.agent.read_file("/mnt/src/later.txt") == b"added on the host\n"


@pytest.mark.asyncio
@pytest.mark.timeout(240)
async def test_read_write_share_restores_and_writes_through(
    tree: Path, sandbox_factory: SandboxFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Attack: guest root leaves a set-uid file and a symlink to a host file in the restored
    writable share; the host must see plain files, and every write at once."""
    builder = (
        capsa.sandbox()
        .memory_mb(384)
        .share(tree / "out", "/mnt/out", AccessMode.READ_WRITE, mechanism="9p")
    )
    vm = await restored(builder, sandbox_factory, caplog)
    assert [(s.guest_path, s.mechanism) for s in vm.shares] == [("/mnt/out", "9p")]
    done = await sh(
        vm,
        "echo from-guest > /mnt/out/a.txt && head -c 3M /dev/zero > /mnt/out/big && "
        "cp /bin/sh /mnt/out/suid && chmod 4755 /mnt/out/suid && "
        f"ln -s {tree / 'secret.txt'} /mnt/out/link",
    )
    assert done.exit_code == 0, done.stderr
    assert (tree / "out" / "a.txt").read_text() == "from-guest\n"  # no flush or sync needed
    assert (tree / "out" / "big").stat().st_size == 3 << 20
    assert not (tree / "out" / "suid").stat().st_mode & 0o6000
    assert not (tree / "out" / "link").is_symlink()
    (tree / "out" / "a.txt").write_text("from-host\n")  # host edits are seen at once too
    assert (await sh(vm, "cat /mnt/out/a.txt")).stdout == "from-host\n"


@pytest.mark.asyncio
@pytest.mark.timeout(240)
async def test_virtiofs_and_cold_still_boot_virtiofs(
    tree: Path, sandbox_factory: SandboxFactory
) -> None:
    share = (tree / "out", "/mnt/out", AccessMode.READ_WRITE)
    explicit = capsa.sandbox().memory_mb(384).share(*share, mechanism="virtiofs")
    for builder in (explicit, capsa.sandbox().memory_mb(384).share(*share).cold()):
        vm = await sandbox_factory(builder)
        assert [s.mechanism for s in vm.shares] == ["virtiofs"]
        assert (await sh(vm, "echo v > /mnt/out/v.txt")).exit_code == 0
        assert (tree / "out" / "v.txt").read_text() == "v\n"
        await vm.kill()


@pytest.mark.timeout(240)
def test_cli_exec_share_uses_the_template_path(tree: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    argv = [sys.executable, "-m", "capsa.cli", "exec", "--memory", "384M"]
    argv += ["--share", f"{tree / 'src'}:/src", "--", "sh", "-c", "grep ' /src ' /proc/mounts"]
    for _ in range(2):  # the first run may record the template
        done = subprocess.run(argv, capture_output=True, text=True, timeout=200, env=env, check=False)
        assert done.returncode == 0, done.stderr
        assert " 9p " in done.stdout, done.stdout
