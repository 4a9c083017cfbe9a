"""QemuProcess waits on its child through a pidfd (no thread per child), reaps it, and the child
starts with its anonymous memory offered to KSM and without transparent huge pages."""

from __future__ import annotations

import asyncio
import signal
import threading
from pathlib import Path

import pytest

from capsa.backend.qemu.process import FIXED_LAYOUT_ENV, QemuProcess
from capsa.errors import ConfigError


def _status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


@pytest.mark.asyncio
async def test_exit_code_and_reaped_without_threads(tmp_path: Path) -> None:
    threads = threading.active_count()
    procs = [
        await QemuProcess.start(["sh", "-c", f"exit {i}"], pass_fds=(), log_path=tmp_path / f"{i}.log")
        for i in range(5)
    ]
    assert threading.active_count() == threads  # no watcher thread per child
    assert [await p.wait(10) for p in procs] == list(range(5))
    for p in procs:
        assert p.returncode == p.exited.result()
        assert not Path(f"/proc/{p.pid}").exists()  # reaped, no zombie


@pytest.mark.asyncio
async def test_kill_is_idempotent_and_reports_the_signal(tmp_path: Path) -> None:
    p = await QemuProcess.start(["sleep", "60"], pass_fds=(), log_path=tmp_path / "log")
    assert await p.kill_and_wait(10) == -signal.SIGKILL
    p.kill()  # after exit: nothing to do, no error
    assert await p.kill_and_wait(10) == -signal.SIGKILL


@pytest.mark.asyncio
async def test_child_is_mergeable_and_without_huge_pages(tmp_path: Path) -> None:
    if not Path("/proc/self/ksm_stat").exists():
        pytest.skip("kernel without /proc/<pid>/ksm_stat (< 6.1)")
    p = await QemuProcess.start(["sleep", "60"], pass_fds=(), log_path=tmp_path / "log")
    try:
        await asyncio.sleep(0.2)  # past exec
        ksm = Path(f"/proc/{p.pid}/ksm_stat").read_text()
        if "ksm_merge_any" in ksm:  # the field exists from Linux 6.7
            assert "ksm_merge_any: yes" in ksm
        assert _status(p.pid).get("THP_enabled") in (None, "0")
    finally:
        await p.kill_and_wait(10)


@pytest.mark.asyncio
async def test_qemu_without_aslr_only_when_asked_and_never_other_binaries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``CAPSA_QEMU_ASLR=off`` (an opt-in for KSM) applies to QEMU only; a bad value is a ConfigError."""
    fake = tmp_path / "qemu-system-x86_64"
    fake.symlink_to("/bin/sleep")
    for value, qemu_fixed in (("", False), ("off", True)):
        monkeypatch.setenv(FIXED_LAYOUT_ENV, value)
        for argv, fixed in (([str(fake), "60"], qemu_fixed), (["sleep", "60"], False)):
            p = await QemuProcess.start(argv, pass_fds=(), log_path=tmp_path / "log")
            try:
                await asyncio.sleep(0.2)
                persona = int(Path(f"/proc/{p.pid}/personality").read_text(), 16)
                assert bool(persona & 0x0040000) is fixed, (value, argv)
            finally:
                await p.kill_and_wait(10)
    monkeypatch.setenv(FIXED_LAYOUT_ENV, "maybe")
    with pytest.raises(ConfigError):
        await QemuProcess.start([str(fake), "60"], pass_fds=(), log_path=tmp_path / "log")
