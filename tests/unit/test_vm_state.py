"""The VM state machine: one transition function, ``wait_for_state()``, and ``VMStateError`` guards."""

from __future__ import annotations

import asyncio

import pytest

import capsa
from capsa.errors import CapsaTimeoutError, VMNotRunning, VMStateError
from capsa.vm.config import VMConfig
from capsa.vm.runstate import RunState


def new_vm() -> capsa.VM:
    return capsa.VM(VMConfig(boot=capsa.LinuxDirectBoot("/nonexistent/vmlinuz")))


def test_a_guard_names_the_state_and_what_was_required() -> None:
    vm = new_vm()
    with pytest.raises(VMStateError) as raised:
        vm.set_lifetime(5)
    assert raised.value.state is RunState.CREATED
    assert raised.value.required == (RunState.RUNNING,)
    assert isinstance(raised.value, VMNotRunning)  # existing ``except VMNotRunning`` still catches it
    assert "created" in raised.value.message and "running" in raised.value.message


@pytest.mark.asyncio
async def test_wait_for_state_follows_transitions() -> None:
    vm = new_vm()
    waiter = asyncio.ensure_future(vm.wait_for_state(RunState.RUNNING, timeout=5))
    await asyncio.sleep(0)
    assert not waiter.done()
    vm._set_state(RunState.STARTING)
    await asyncio.sleep(0)
    assert not waiter.done()
    vm._set_state(RunState.RUNNING)
    assert await waiter is RunState.RUNNING
    assert await vm.wait_for_state(RunState.RUNNING, RunState.STOPPED, timeout=0.1) is RunState.RUNNING
    with pytest.raises(CapsaTimeoutError):
        await vm.wait_for_state(RunState.STOPPED, timeout=0.05)


def test_final_states_are_final_and_illegal_transitions_are_refused() -> None:
    vm = new_vm()
    assert not vm._set_state(RunState.RUNNING)  # CREATED -> RUNNING skips STARTING: refused
    assert vm.status is RunState.CREATED
    assert vm._set_state(RunState.STOPPED)  # never started, stopped
    assert not vm._set_state(RunState.RUNNING)  # nothing leaves a final state
    assert vm.status is RunState.STOPPED
