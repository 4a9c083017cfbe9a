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
        vm.console.wait_for(PROMPT, timeout=10)  # else "sleep 100" is echoed before the prompt,
        vm.console.write_line("sleep 100")  # and the prompt left unread passes for the one after ^C
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


NET = capsa.VirtualNetwork.with_gateway(
    capsa.Gateway("10.0.8.0/24").policy(capsa.NetworkPolicy.deny_all()).dns_servers(["127.0.0.1:9"])
)


@pytest.mark.timeout(300)
def test_sync_cluster_members_share_its_thread_and_streams_block() -> None:
    with sync.cluster(NET) as c:
        app = c.add("app", sync.sandbox().memory_mb(256))
        assert isinstance(app, sync.SyncSandbox) and c["app"].status is capsa.RunState.RUNNING
        proc = app.agent.exec("sh").args(["-c", "echo one; echo two"]).spawn()
        assert proc.stdout.readline() == b"one\n"
        assert b"".join(proc.stdout) == b"two\n"  # iteration continues after readline()
        assert proc.wait(timeout=30) == 0 and proc.returncode == 0

        [worker] = c.add_forks("worker", app, 1)  # the source: a member, on the cluster's thread
        assert worker.agent.exec("hostname").run().stdout.strip() == "worker-0"
        server = worker.agent.exec("python3").args(["-m", "http.server", "8000"]).spawn()
        fetch = "import urllib.request as u; print(u.urlopen('http://worker-0:8000/').status)"
        for _ in range(30):  # the server takes a moment to listen under TCG
            r = app.agent.exec("python3").args(["-c", fetch]).timeout(60).run()
            if r.exit_code == 0:
                break
        assert r.stdout.strip() == "200", r.stderr
        server.kill()

        app.stop()  # stops that member only: the cluster's thread and the others run on
        assert {m.name: m.alive for m in c.members()} == {"app": False, "worker-0": True}
        assert worker.agent.exec("true").run().exit_code == 0
    assert worker.status in (capsa.RunState.STOPPED, capsa.RunState.FAILED)
    with pytest.raises(capsa.ConfigError):
        c.add("late", sync.sandbox())
