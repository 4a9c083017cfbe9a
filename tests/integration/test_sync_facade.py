"""The synchronous facade drives the same real guest with the same names."""

from __future__ import annotations

import pytest

import capsa
from capsa import sync
from tests.guest import PROMPT, READY_MARKER, GuestFiles

pytestmark = [pytest.mark.vm]


def test_sync_vm_console_and_stop(test_guest: GuestFiles) -> None:
    boot = capsa.LinuxDirectBoot(test_guest.kernel, test_guest.initrd)
    with sync.vm(boot).cpus(2).memory_mb(256).build() as vm:
        assert vm.status is capsa.RunState.RUNNING
        assert vm.accelerator in ("kvm", "tcg")
        vm.console.wait_for(READY_MARKER, timeout=60)
        vm.console.wait_for(PROMPT, timeout=30)
        assert vm.console.exec_line("nproc") == "2\n"
        vm.console.write_line("echo sync-facade")
        index, _ = vm.console.wait_for_any(["nothing", "sync-facade\r\n"], timeout=10)
        assert index == 1
        vm.console.write_line("sleep 100")
        vm.console.wait_for("sleep 100", timeout=10)
        # ash's line editor may still own the tty for a moment; a person presses Ctrl-C again too.
        for _ in range(10):
            vm.console.send_interrupt()
            try:
                vm.console.wait_for(PROMPT, timeout=2)
                break
            except capsa.ConsoleTimeoutError:
                continue
        else:
            pytest.fail("Ctrl-C never interrupted the guest's sleep")
        vm.console.read_available(timeout=0.2)  # drain what followed the prompt
        # The interrupt ended the sleep, not the shell: the next line runs at once.
        assert "sleep 100" not in vm.console.exec_line("ps | grep -v grep | grep sleep || true")
        assert vm.console.exec_line("echo al$((1+1))ive") == "al2ive\n"
        log_dir = vm.log_dir
    assert vm.status is capsa.RunState.STOPPED
    assert vm.exit_code == 0
    assert not log_dir.exists()
    vm.stop()  # idempotent after the portal closed


def test_sync_builder_context_and_errors(test_guest: GuestFiles) -> None:
    boot = capsa.LinuxDirectBoot(test_guest.kernel, test_guest.initrd)
    with sync.vm(boot) as vm:
        vm.console.wait_for(READY_MARKER, timeout=60)
        with pytest.raises(capsa.ConsoleTimeoutError):
            vm.console.wait_for("never-printed", timeout=0.5)
    assert vm.status is capsa.RunState.STOPPED
    with pytest.raises(capsa.ConfigError):
        sync.vm(capsa.LinuxDirectBoot("/nonexistent/vmlinuz")).build()
