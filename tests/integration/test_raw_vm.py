"""Raw VMs on real guests: boot, console, lifecycle, disks, several VMs."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

import capsa
from tests.conftest import VMFactory
from tests.guest import PROMPT, READY_MARKER

pytestmark = [pytest.mark.vm, pytest.mark.asyncio]


async def test_boot_to_marker_and_report(vm_factory: VMFactory) -> None:
    vm = await vm_factory()
    assert vm.status is capsa.RunState.RUNNING
    assert vm.accelerator in ("kvm", "tcg")
    text = await vm.console.wait_for(READY_MARKER, timeout=60)
    assert "Linux version" in text  # the kernel's own banner precedes the marker
    assert (vm.log_dir / "console.log").read_bytes().count(READY_MARKER.encode()) == 1
    assert (vm.log_dir / "qemu.log").exists()


async def test_regex_pattern_and_wait_for_any(guest_vm: capsa.VM) -> None:
    console = guest_vm.console
    await console.write_line("echo value=$((6*7))")
    text = await console.wait_for(re.compile(r"value=(\d+)\r?\n"), timeout=10)
    assert "value=42" in text
    await console.write_line("echo second-thing")
    index, text = await console.wait_for_any(["first-thing\r", "second-thing\r"], timeout=10)
    assert index == 1
    assert text.endswith("second-thing\r")


async def test_exec_line_repeated_variable_sizes(guest_vm: capsa.VM) -> None:
    console = guest_vm.console
    for i in range(30):
        count = (i * 37) % 400
        output = await console.exec_line(f"seq 1 {count}", timeout=30)
        expected = "".join(f"{n}\n" for n in range(1, count + 1))
        assert output == expected, f"round {i}: {output[:200]!r}"


async def test_exec_line_without_trailing_newline(guest_vm: capsa.VM) -> None:
    assert await guest_vm.console.exec_line("printf abc") == "abc"


async def test_echo_and_ctrl_c(guest_vm: capsa.VM) -> None:
    console = guest_vm.console
    await console.write_line("sleep 1000")
    await console.wait_for("sleep 1000", timeout=10)  # the tty echoes what we type
    # ash's line editor may still own the tty for a moment; a person presses Ctrl-C again too.
    for _ in range(10):
        await console.send_interrupt()
        try:
            await console.wait_for(PROMPT, timeout=2)
            break
        except capsa.ConsoleTimeoutError:
            continue
    else:
        pytest.fail("Ctrl-C never interrupted the guest's sleep")
    # The shell is alive and the sleep is gone.
    assert "sleep 1000" not in await console.exec_line("ps | grep -v grep | grep sleep || true")
    assert await console.exec_line("echo alive") == "alive\n"


async def test_read_available_returns_recent_output(guest_vm: capsa.VM) -> None:
    console = guest_vm.console
    await console.read_available()
    await console.write_line("echo hello-there")
    await console.wait_for("hello-there\r\n", timeout=10)
    await console.write_line("echo again")
    collected = ""
    for _ in range(100):
        collected += await console.read_available(timeout=0.1)
        if "again\r\n" in collected.replace("echo again", ""):
            break
    assert "again" in collected


async def test_two_vcpus_visible(vm_factory: VMFactory, boot: capsa.LinuxDirectBoot) -> None:
    vm = await vm_factory(capsa.vm(boot).cpus(2).memory_mb(384))
    await vm.console.wait_for(READY_MARKER, timeout=60)
    await vm.console.wait_for(PROMPT, timeout=30)
    assert (await vm.console.exec_line("nproc")).strip() == "2"
    mem_kb = int((await vm.console.exec_line("awk '/MemTotal/{print $2}' /proc/meminfo")).strip())
    assert 300_000 < mem_kb <= 384 * 1024


async def test_graceful_stop_powers_off(guest_vm: capsa.VM) -> None:
    log_dir = guest_vm.log_dir
    await guest_vm.stop(timeout=20)
    assert guest_vm.status is capsa.RunState.STOPPED
    assert guest_vm.exit_code == 0
    assert guest_vm.shutdown_reason == "guest-shutdown"
    assert not log_dir.exists()
    await guest_vm.stop()  # idempotent
    await guest_vm.kill()


async def test_stop_kills_a_guest_that_ignores_the_power_button(
    vm_factory: VMFactory, boot: capsa.LinuxDirectBoot
) -> None:
    vm = await vm_factory(capsa.vm(boot).cmdline_arg("rdinit", "/bin/sh"))
    await vm.console.wait_for("#", timeout=60)
    started = asyncio.get_running_loop().time()
    await vm.stop(timeout=1)
    assert asyncio.get_running_loop().time() - started < 10
    assert vm.status is capsa.RunState.STOPPED
    assert vm.exit_code == -9


async def test_guest_poweroff_while_waiting_raises_vm_exited(guest_vm: capsa.VM) -> None:
    await guest_vm.console.write_line("poweroff -f")
    with pytest.raises(capsa.VMExited) as info:
        await guest_vm.console.wait_for("this never appears", timeout=60)
    assert info.value.exit_code == 0
    assert guest_vm.status is capsa.RunState.STOPPED
    assert await guest_vm.wait(timeout=5) == 0


async def test_guest_panic_raises_vm_exited_with_console_tail(guest_vm: capsa.VM) -> None:
    await guest_vm.console.write_line("echo c > /proc/sysrq-trigger")
    with pytest.raises(capsa.VMExited) as info:
        await guest_vm.console.wait_for("this never appears", timeout=60)
    assert "Kernel panic" in info.value.console_tail or "sysrq" in info.value.console_tail.lower()
    assert guest_vm.shutdown_reason == "guest-reset"


async def test_timeout_carries_console_tail(guest_vm: capsa.VM) -> None:
    await guest_vm.console.write_line("echo last-words")
    with pytest.raises(capsa.ConsoleTimeoutError) as info:
        await guest_vm.console.wait_for("never-printed", timeout=1.5)
    assert isinstance(info.value, TimeoutError)
    assert "last-words" in info.value.console_tail
    assert "last-words" in str(info.value)


async def test_disks_read_only_and_read_write(
    vm_factory: VMFactory, boot: capsa.LinuxDirectBoot, tmp_path: Path
) -> None:
    ro = tmp_path / "ro.img"
    rw = tmp_path / "rw.img"
    ro.write_bytes(b"READ-ONLY-PATTERN" + b"\0" * (1 << 20))
    rw.write_bytes(b"\0" * (1 << 20))
    vm = await vm_factory(capsa.vm(boot).disk(ro, read_only=True).disk(rw))
    await vm.console.wait_for(READY_MARKER, timeout=60)
    await vm.console.wait_for(PROMPT, timeout=30)
    console = vm.console
    assert await console.exec_line("head -c 17 /dev/vda; echo") == "READ-ONLY-PATTERN\n"
    refused = await console.exec_line("echo x | dd of=/dev/vda conv=fsync 2>&1; echo rc=$?")
    assert "rc=1" in refused
    await console.exec_line("printf GUEST-WROTE-THIS | dd of=/dev/vdb conv=fsync 2>/dev/null")
    assert await console.exec_line("head -c 16 /dev/vdb; echo") == "GUEST-WROTE-THIS\n"
    await vm.stop(timeout=20)
    assert rw.read_bytes()[:16] == b"GUEST-WROTE-THIS"
    assert ro.read_bytes()[:17] == b"READ-ONLY-PATTERN"


async def test_two_vms_at_once_then_one_after_another(vm_factory: VMFactory) -> None:
    first, second = await asyncio.gather(vm_factory(), vm_factory())
    assert first.pid != second.pid
    await asyncio.gather(
        first.console.wait_for(READY_MARKER, timeout=90),
        second.console.wait_for(READY_MARKER, timeout=90),
    )
    await asyncio.gather(first.console.wait_for(PROMPT), second.console.wait_for(PROMPT))
    await first.console.exec_line("echo one > /tmp/who")
    await second.console.exec_line("echo two > /tmp/who")
    assert await first.console.exec_line("cat /tmp/who") == "one\n"
    assert await second.console.exec_line("cat /tmp/who") == "two\n"
    await asyncio.gather(first.stop(timeout=20), second.stop(timeout=20))
    third = await vm_factory()
    await third.console.wait_for(READY_MARKER, timeout=60)
    await third.stop(timeout=20)
    assert third.status is capsa.RunState.STOPPED


async def test_builder_as_async_context_manager(boot: capsa.LinuxDirectBoot) -> None:
    async with capsa.vm(boot) as vm:
        await vm.console.wait_for(READY_MARKER, timeout=60)
        pid = vm.pid
        log_dir = vm.log_dir
    assert vm.status is capsa.RunState.STOPPED
    assert not log_dir.exists()
    assert pid is not None and not Path(f"/proc/{pid}").exists()


async def test_q35_machine_boots(vm_factory: VMFactory, boot: capsa.LinuxDirectBoot) -> None:
    vm = await vm_factory(capsa.vm(boot).machine("q35"))
    await vm.console.wait_for(READY_MARKER, timeout=90)
