"""Attacks on the host side's own resources: things a guest (or a careless caller) can do to make the
host process leak, stall, lose errors or delete its own runtime files."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import capsa
from capsa.sandbox.builder import SandboxBuilder
from tests.conftest import SandboxFactory

SNAPSHOT_RETRY_SECONDS = 10.0


async def _snapshot_when_idle(vm: capsa.Sandbox, path: Path) -> capsa.Snapshot:
    """Snapshot as soon as the agent is idle (the spawned process may take a moment to end)."""
    deadline = time.monotonic() + SNAPSHOT_RETRY_SECONDS
    while True:
        try:
            return await vm.snapshot(path)
        except capsa.SnapshotError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


@pytest.mark.vm
@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_unwaited_finished_process_does_not_block_snapshot_or_fork(
    tmp_path: Path, sandbox_factory: SandboxFactory
) -> None:
    """Attack: spawn a short command and never call ``wait()`` on it. The agent's bookkeeping kept the
    finished process as "in flight" forever, so every later ``snapshot()``/``fork()`` failed with
    "agent is busy": one forgotten handle disabled snapshots of that sandbox for good."""
    vm = await sandbox_factory()
    forgotten = await vm.agent.exec("sh").args(["-c", "echo bye"]).spawn()
    snap = await _snapshot_when_idle(vm, tmp_path / "snap")
    assert snap.path.is_dir()
    (clone,) = await vm.fork(1)
    try:
        assert (await clone.agent.exec("echo").arg("clone").run()).stdout == "clone\n"
    finally:
        await clone.kill()
    # The forgotten handle still works for a caller who comes back to it.
    assert await forgotten.wait(timeout=10) == 0
    assert await forgotten.stdout.read() == b"bye\n"


@pytest.mark.vm
@pytest.mark.asyncio
@pytest.mark.timeout(180)
async def test_running_spawned_process_is_captured_by_snapshot_and_fork_without_stalling(
    tmp_path: Path, sandbox_factory: SandboxFactory
) -> None:
    """Attack: keep a spawned process running (or blocked on output nobody reads) and ask for a
    snapshot or fork. It must neither wait forever nor capture half a conversation: it finishes
    promptly, the parent's handles keep working, and the copy finds both processes running. A file
    transfer in flight still makes it fail at once, saying so."""
    vm = await sandbox_factory()
    sleeper = await vm.agent.exec("sleep").arg("300").spawn()
    flooder = await vm.agent.exec("head").args(["-c", "40000000", "/dev/zero"]).spawn()
    started = time.monotonic()
    snap = await vm.snapshot(tmp_path / "snap")
    (clone,) = await vm.fork(1)
    try:
        assert time.monotonic() - started < 60.0
        listed = {p.pid: p for p in await clone.agent.processes()}
        assert listed[sleeper.pid].running and listed[flooder.pid].running, listed
        assert listed[sleeper.pid].argv == ("sleep", "300")
        copy = await clone.agent.attach(flooder.pid)
        await copy.kill()
        await asyncio.wait_for(copy.stdout.read(), 60)
        assert await copy.wait(timeout=10) == 137
    finally:
        await clone.kill()
    assert snap.path.is_dir()
    for process in (sleeper, flooder):
        await process.kill()
        await asyncio.wait_for(process.stdout.read(), 60)  # what it printed must still be read
        await process.wait(timeout=10)
    await vm.agent.write_file("/tmp/big", b"x" * (48 << 20))
    transfer = asyncio.create_task(vm.agent.read_file("/tmp/big"))
    await asyncio.sleep(0.2)
    with pytest.raises(capsa.SnapshotError, match="in flight"):
        await vm.snapshot(tmp_path / "busy")
    assert len(await transfer) == 48 << 20
    assert not (tmp_path / "busy").exists()
    # a caller sharing the sandbox (capsa serve) waits for the transfer instead, then saves
    transfer = asyncio.create_task(vm.agent.read_file("/tmp/big"))
    await asyncio.sleep(0.2)
    assert not await vm.agent.wait_idle(0.05)
    assert await vm.agent.wait_idle(60)
    await vm.snapshot(tmp_path / "after-wait")
    assert len(await transfer) == 48 << 20


@pytest.mark.vm
@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_unwaited_processes_do_not_pile_up_on_the_host(sandbox_factory: SandboxFactory) -> None:
    """Attack (host memory leak): spawn many commands and drop their handles. Every finished but
    unwaited process kept its call, its buffered output and its entry in the channel forever."""
    vm = await sandbox_factory()
    channel = vm.agent.channel
    baseline = len(channel._calls)
    for index in range(20):
        await vm.agent.exec("echo").arg(str(index)).spawn()  # handle dropped at once
    deadline = time.monotonic() + 15
    while len(channel._calls) > baseline and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert len(channel._calls) == baseline
    assert (await vm.agent.exec("true").run()).exit_code == 0


class _BrokenBuilder(SandboxBuilder):
    """A sandbox builder whose builds fail with an error that is not a ``CapsaError`` (what a full
    disk, a bug, or a malformed snapshot record raising ``KeyError`` looks like)."""

    def __init__(self) -> None:
        super().__init__()
        self.attempts = 0

    async def build(self, timeout: float = 120.0) -> capsa.Sandbox:
        self.attempts += 1
        raise OSError(28, "No space left on device")


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_pool_refill_survives_non_capsa_errors_and_take_says_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Attack: make the pool's background builds fail with an error that is not a ``CapsaError``.
    The refill task died silently on the first one: ``take()`` then timed out without a reason, the
    pool never refilled again, and ``close()`` raised the stale error."""
    caplog.set_level(logging.WARNING, logger="capsa")
    builder = _BrokenBuilder()
    pool = capsa.Pool(builder, 1)
    try:
        with pytest.raises(capsa.CapsaTimeoutError, match="No space left on device"):
            await pool.take(timeout=2.5)
        assert isinstance(pool.last_error, OSError)
        assert builder.attempts >= 2, "the filler stopped retrying"
        logged = [r for r in caplog.records if r.exc_info and "No space left" in str(r.exc_info[1])]
        assert logged, "the failure was not logged with its traceback"
    finally:
        await pool.close()  # must not raise the builder's error


def test_guardian_of_a_forked_child_keeps_the_parents_runtime_dir(tmp_path: Path) -> None:
    """Attack: ``os.fork()`` in a program that uses capsa (a worker pool, a daemonising tool). The
    child inherited the guardian's ``atexit`` handler and deleted the parent's whole runtime dir
    (every running VM's sockets and logs) when it exited. The child gets a root of its own."""
    script = textwrap.dedent(
        """
        import os, sys
        from pathlib import Path
        from capsa import _guardian

        parent_dir = _guardian.new_vm_dir()
        (parent_dir / "keep").write_text("x")
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child uses capsa too, then exits through the interpreter (atexit runs)
            os.close(read)
            child_dir = _guardian.new_vm_dir()
            os.write(write, str(child_dir).encode())
            os.close(write)
            sys.exit(0)
        os.close(write)
        child_dir = Path(os.read(read, 4096).decode())
        os.close(read)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status))
        print((parent_dir / "keep").exists())
        print(child_dir.parent != parent_dir.parent)
        print(child_dir.parent.exists())
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    exit_code, parent_kept, own_root, child_root_left = done.stdout.split()
    assert exit_code == "0"
    assert parent_kept == "True", "the forked child deleted the parent's runtime dir"
    assert own_root == "True", "the forked child shared the parent's runtime root"
    assert child_root_left == "False", "the forked child left its own runtime root behind"
