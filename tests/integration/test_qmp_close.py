"""A VM whose QEMU exited closes its QMP connection at once: nothing of qemu.qmp's (its reader's
EOFError in a gathering future) is left for asyncio to report as "never retrieved" when a handle
nobody stopped is freed (issue 27)."""

from __future__ import annotations

import asyncio
import gc
import logging
import shutil
import socket
from typing import Any

import pytest

import capsa
from capsa.image.kernels import default_kernel

pytestmark = [pytest.mark.vm, pytest.mark.asyncio]


@pytest.mark.timeout(180)
async def test_a_dropped_exited_vm_leaves_nothing_unretrieved(caplog: pytest.LogCaptureFixture) -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    caplog.set_level(logging.ERROR)
    kernel = default_kernel()
    # No initramfs and no root disk: the kernel panics at once, and panic=-1 ends QEMU.
    vm = await capsa.vm(capsa.LinuxDirectBoot(kernel.path)).memory_mb(128).build(60)
    vm_dir = vm.log_dir.parent
    try:
        with pytest.raises(capsa.VMExited):
            await vm.console.wait_for("this never appears", timeout=120)
        for _ in range(50):  # the exit watcher closes QMP right after QEMU's exit
            await asyncio.sleep(0.05)
            if vm.status.is_final:
                break
        await asyncio.sleep(0.2)
        del vm  # dropped without stop(): what it held is freed now
        for _ in range(3):
            gc.collect()
            await asyncio.sleep(0.05)
    finally:
        loop.set_exception_handler(previous)
        shutil.rmtree(vm_dir, ignore_errors=True)  # the dropped handle never cleaned up
    messages = [str(context.get("message")) for context in reported]
    assert messages == [], messages
    logged = [r.getMessage() for r in caplog.records if "never retrieved" in r.getMessage()]
    assert logged == []


@pytest.mark.timeout(60)
async def test_a_refused_qmp_command_keeps_qmps_error_class() -> None:
    """BackendError carries QMP's error class and the command (not only a flattened string)."""
    from capsa.backend.qemu.monitor import Monitor
    from capsa.backend.qemu.process import find_qemu

    host, theirs = socket.socketpair()
    qemu = await asyncio.create_subprocess_exec(
        find_qemu(), "-M", "none", "-nodefaults", "-display", "none", "-chardev",
        f"socket,id=qmp,fd={theirs.fileno()}", "-mon", "chardev=qmp,mode=control",
        pass_fds=[theirs.fileno()],
    )  # fmt: skip
    theirs.close()
    monitor = Monitor("test")
    try:
        await monitor.connect(host, 10)
        with pytest.raises(capsa.BackendError) as info:
            await monitor.execute("no-such-command")
        assert info.value.command == "no-such-command"
        assert info.value.qmp_class == "CommandNotFound"
        assert "CommandNotFound" in str(info.value)
        await monitor.execute("quit")
    finally:
        await monitor.close()
        if qemu.returncode is None:
            try:
                await asyncio.wait_for(qemu.wait(), 10)
            except TimeoutError:
                qemu.kill()
                await qemu.wait()
