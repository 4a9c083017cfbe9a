"""Shared fixtures. VM fixtures save the console transcript and QEMU log of a failed test under
``test-artifacts/`` and always kill what they started."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

import capsa
from tests.guest import GuestFiles, build_test_guest

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[Any]:
    report = yield
    if report.failed:
        item.stash.setdefault(_FAILED, True)
    return report


_FAILED = pytest.StashKey[bool]()


def _save_logs(request: pytest.FixtureRequest, vms: list[capsa.VM]) -> None:
    if not request.node.stash.get(_FAILED, False):
        return
    target = ARTIFACTS / request.node.name.replace("/", "_")
    for index, vm in enumerate(vms):
        try:
            source = vm.log_dir
        except capsa.VMNotRunning:
            continue
        if source.exists():
            shutil.copytree(source, target / f"vm{index}", dirs_exist_ok=True)


@pytest.fixture(scope="session")
def test_guest() -> GuestFiles:
    return build_test_guest()


@pytest.fixture
def boot(test_guest: GuestFiles) -> capsa.LinuxDirectBoot:
    return capsa.LinuxDirectBoot(test_guest.kernel, test_guest.initrd)


VMFactory = Callable[..., Awaitable[capsa.VM]]


@pytest_asyncio.fixture
async def vm_factory(
    request: pytest.FixtureRequest, boot: capsa.LinuxDirectBoot
) -> AsyncIterator[VMFactory]:
    """``await vm_factory(builder=None)`` starts a VM (default: the test guest) and tracks it."""
    started: list[capsa.VM] = []

    async def make(builder: capsa.VMBuilder | None = None, timeout: float = 30.0) -> capsa.VM:
        builder = builder or capsa.vm(boot)
        vm = await builder.build(timeout)
        started.append(vm)
        return vm

    try:
        yield make
    finally:
        _save_logs(request, started)
        for vm in started:
            await vm.kill()


@pytest_asyncio.fixture
async def guest_vm(vm_factory: VMFactory) -> capsa.VM:
    """A booted test guest with its shell prompt reached."""
    from tests.guest import PROMPT, READY_MARKER

    vm = await vm_factory()
    await vm.console.wait_for(READY_MARKER, timeout=60)
    await vm.console.wait_for(PROMPT, timeout=30)
    return vm


SandboxFactory = Callable[..., Awaitable[capsa.Sandbox]]


@pytest_asyncio.fixture
async def sandbox_factory(request: pytest.FixtureRequest) -> AsyncIterator[SandboxFactory]:
    """``await sandbox_factory(builder=None)`` boots a sandbox (default: ``capsa.sandbox()``), saves
    its logs if the test fails, and always kills it."""
    started: list[capsa.VM] = []

    async def make(builder: capsa.SandboxBuilder | None = None, timeout: float = 120.0) -> capsa.Sandbox:
        vm = await (builder or capsa.sandbox()).build(timeout)
        started.append(vm)
        return vm

    try:
        yield make
    finally:
        _save_logs(request, started)
        for vm in started:
            await vm.kill()


@pytest_asyncio.fixture
async def sandbox(sandbox_factory: SandboxFactory) -> capsa.Sandbox:
    """A fresh default sandbox for this test."""
    return await sandbox_factory()
