"""Lifetimes: a sandbox (or raw VM) that is stopped and removed when its time is up."""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
import time

import pytest

import capsa
from capsa import sync
from capsa.vm import VMConfig
from tests.conftest import SandboxFactory, VMFactory

BAD_LIFETIMES = [0, -1, -0.5, math.nan, math.inf, -math.inf, "3", None, True, [3]]
SLACK = 4.0  # seconds a stop may take past the deadline on a loaded 2-core TCG host


async def _gone_within(vm: capsa.VM, seconds: float) -> float:
    """Wait until ``vm`` has been stopped on its own; returns when (monotonic)."""
    deadline = time.monotonic() + seconds
    while not vm.status.is_final:
        assert time.monotonic() < deadline, f"still {vm.status.value} after {seconds}s"
        await asyncio.sleep(0.05)
    return time.monotonic()


@pytest.mark.parametrize("bad", BAD_LIFETIMES)
def test_invalid_lifetimes_are_config_errors(bad: object, test_guest: object) -> None:
    with pytest.raises(capsa.ConfigError, match="lifetime"):
        capsa.sandbox().lifetime(bad)  # type: ignore[arg-type]
    with pytest.raises(capsa.ConfigError, match="lifetime"):
        sync.sandbox().lifetime(bad)  # type: ignore[arg-type]
    boot = capsa.LinuxDirectBoot(test_guest.kernel, test_guest.initrd)  # type: ignore[attr-defined]
    with pytest.raises(capsa.ConfigError, match="lifetime"):
        capsa.vm(boot).lifetime(bad)  # type: ignore[arg-type]
    with pytest.raises(capsa.ConfigError, match="lifetime"):
        capsa.Sandbox(VMConfig(boot=boot)).set_lifetime(bad)  # type: ignore[arg-type]


def test_lifetime_of_a_vm_that_is_not_running(test_guest: object) -> None:
    boot = capsa.LinuxDirectBoot(test_guest.kernel, test_guest.initrd)  # type: ignore[attr-defined]
    vm = capsa.VM(VMConfig(boot=boot))
    assert vm.lifetime_remaining is None
    with pytest.raises(capsa.VMNotRunning):
        vm.set_lifetime(5)
    assert capsa.sandbox().lifetime(2.5).config.lifetime == 2.5


@pytest.mark.vm
@pytest.mark.asyncio
@pytest.mark.timeout(90)
async def test_sandbox_is_removed_when_its_lifetime_expires(sandbox_factory: SandboxFactory) -> None:
    vm = await sandbox_factory(capsa.sandbox().lifetime(3))
    started = time.monotonic()
    remaining = vm.lifetime_remaining
    assert remaining is not None and 2.0 < remaining <= 3.0
    assert (await vm.agent.exec("true").run()).exit_code == 0
    log_dir = vm.log_dir
    gone = await _gone_within(vm, 3 + SLACK)
    assert gone - started >= 2.9
    assert vm.status is capsa.RunState.STOPPED
    # removed, not only stopped: the status turns final when QEMU exits, the clean-up follows
    removed_by = time.monotonic() + SLACK
    while log_dir.exists() and time.monotonic() < removed_by:
        await asyncio.sleep(0.05)
    assert not log_dir.exists()
    for call in (
        vm.agent.exec("true").run(),
        vm.agent.read_file("/etc/hostname"),
        vm.agent.ping(),
        vm.snapshot(log_dir.parent / "snap"),
        vm.fork(1),
    ):
        with pytest.raises(capsa.VMNotRunning, match="lifetime of 3s expired"):
            await call
    with pytest.raises(capsa.VMNotRunning, match="lifetime"):
        vm.set_lifetime(10)
    await vm.stop()  # still fine: stopping a gone sandbox is a no-op


@pytest.mark.vm
@pytest.mark.asyncio
@pytest.mark.timeout(90)
async def test_set_lifetime_extends_and_shortens(sandbox_factory: SandboxFactory) -> None:
    vm = await sandbox_factory(capsa.sandbox().lifetime(2))
    vm.set_lifetime(30)  # extend: counted from now
    await asyncio.sleep(3)
    assert (await vm.agent.exec("echo").arg("alive").run()).stdout == "alive\n"
    remaining = vm.lifetime_remaining
    assert remaining is not None and 20 < remaining < 28
    # A running command is cut off when the lifetime is shortened under it.
    sleeper = await vm.agent.exec("sleep").arg("60").spawn()
    shortened = time.monotonic()
    vm.set_lifetime(1)
    gone = await _gone_within(vm, 1 + SLACK)
    assert gone - shortened >= 0.9
    with pytest.raises(capsa.VMNotRunning, match="lifetime of 1s expired"):
        await sleeper.wait(timeout=10)
    with pytest.raises(capsa.VMNotRunning, match="lifetime"):
        await vm.agent.exec("true").run()


@pytest.mark.vm
@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_pooled_sandbox_lifetime_starts_at_take() -> None:
    lifetime = 5.0
    async with await capsa.pool(capsa.sandbox().lifetime(lifetime), size=1) as pool:
        deadline = time.monotonic() + 60
        while pool.available < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert pool.available == 1
        await asyncio.sleep(lifetime + 0.5)  # longer than the lifetime: it must not have started yet
        vm = await pool.take(timeout=10)
        taken = time.monotonic()
        try:
            remaining = vm.lifetime_remaining  # read at once: a loaded host makes the exec slow
            assert remaining is not None and lifetime - 1.0 < remaining <= lifetime
            assert (await vm.agent.exec("true").run()).exit_code == 0
            gone = await _gone_within(vm, lifetime + SLACK)
            assert gone - taken >= lifetime - 0.1
            with pytest.raises(capsa.VMNotRunning, match="lifetime"):
                await vm.agent.exec("true").run()
        finally:
            await vm.kill()


@pytest.mark.vm
@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_forks_keep_their_parents_deadline(sandbox_factory: SandboxFactory) -> None:
    parent = await sandbox_factory(capsa.sandbox().lifetime(60))
    (clone,) = await parent.fork(1)
    try:
        parent_left, clone_left = parent.lifetime_remaining, clone.lifetime_remaining
        assert parent_left is not None and clone_left is not None
        assert abs(parent_left - clone_left) < 1.0
        clone.set_lifetime(300)  # each clone's own from then on
        remaining = clone.lifetime_remaining
        assert remaining is not None and remaining > 200
        parent_now = parent.lifetime_remaining
        assert parent_now is not None and parent_now < 60
    finally:
        await clone.kill()
    plain = await sandbox_factory()
    (plain_clone,) = await plain.fork(1)
    try:
        assert plain.lifetime_remaining is None and plain_clone.lifetime_remaining is None
    finally:
        await plain_clone.kill()


@pytest.mark.vm
@pytest.mark.asyncio
@pytest.mark.timeout(90)
async def test_raw_vm_lifetime(vm_factory: VMFactory, boot: capsa.LinuxDirectBoot) -> None:
    vm = await vm_factory(capsa.vm(boot).lifetime(2))
    started = time.monotonic()
    gone = await _gone_within(vm, 2 + SLACK)
    assert gone - started >= 1.9
    with pytest.raises(capsa.VMNotRunning, match="lifetime of 2s expired"):
        await vm.console.wait_for("never printed", timeout=5)


@pytest.mark.vm
@pytest.mark.timeout(90)
def test_sync_facade_lifetime() -> None:
    with sync.sandbox().lifetime(60).build() as vm:
        remaining = vm.lifetime_remaining
        assert remaining is not None and 50 < remaining <= 60
        vm.set_lifetime(1)
        deadline = time.monotonic() + 1 + SLACK
        while not vm.status.is_final and time.monotonic() < deadline:
            time.sleep(0.05)
        assert vm.status is capsa.RunState.STOPPED
        with pytest.raises(capsa.VMNotRunning, match="lifetime"):
            vm.agent.exec("true").run()


@pytest.mark.vm
@pytest.mark.timeout(180)
def test_cli_exec_lifetime() -> None:
    command = [sys.executable, "-m", "capsa.cli", "exec"]
    bad = subprocess.run(
        [*command, "--lifetime", "0", "--", "true"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2 and "lifetime" in bad.stderr and "Traceback" not in bad.stderr
    started = time.monotonic()
    done = subprocess.run(
        [*command, "--lifetime", "3", "--", "sh", "-c", "echo started; sleep 60"],
        capture_output=True, text=True, timeout=150, check=False,
    )  # fmt: skip
    assert done.returncode == 124, done.stderr
    assert done.stdout == "started\n"
    assert "lifetime of 3s expired" in done.stderr and "Traceback" not in done.stderr
    assert time.monotonic() - started < 60
