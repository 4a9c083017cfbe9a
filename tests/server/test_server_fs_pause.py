"""``capsa serve``: filesystem-only pauses and snapshots (E2B's ``mode="filesystem"``), the timeout
0 of ``set_timeout``, and a command's timeout across a pause. A filesystem-only resume (or a
sandbox made from such a snapshot) boots afresh: a new ``boot_id``, no processes, the files as they
were. One server for the module."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest

from tests.server.conftest import Server, start_server

e2b = pytest.importorskip("e2b")
from e2b import Sandbox  # noqa: E402

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]

BOOT_ID = "/proc/sys/kernel/random/boot_id"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(tmp_path_factory.mktemp("serve"), "--max-sandboxes", "3", "--memory", "256")
    old = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    try:
        yield server
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        code = server.stop()
        assert code in (0, -signal.SIGTERM), server.log.read_text()[-3000:]


def _prepare(sandbox: Sandbox) -> str:
    """Files changed three ways, a running command; returns the guest's boot id."""
    sandbox.files.write("/home/user/kept.txt", "persisted")
    sandbox.commands.run(
        "mkdir -p /root/deep/er && echo x > /root/deep/er/f && chmod 600 /root/deep/er/f && "
        "ln -s /root/deep/er/f /home/user/link && rm /etc/issue",
        user="root",  # root's home and /etc
    )
    sandbox.commands.run("sleep 600", background=True)
    return sandbox.files.read(BOOT_ID).strip()


def _processes(sandbox: Sandbox) -> str:
    """Every guest process's command line (the base image has no ``ps``)."""
    return str(sandbox.commands.run("cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' '").stdout)


def _check_fresh_boot(sandbox: Sandbox, boot: str) -> None:
    assert sandbox.files.read("/home/user/kept.txt") == "persisted"
    out = sandbox.commands.run(
        "cat /home/user/link; stat -c %a /root/deep/er/f; test -e /etc/issue || echo gone",
        user="root",
    ).stdout
    assert out.split() == ["x", "600", "gone"]
    assert sandbox.files.read(BOOT_ID).strip() != boot  # a new boot, not a memory restore
    assert sandbox.commands.list() == []  # the command did not come along
    assert "sleep 600" not in _processes(sandbox)


def _wait_state(sandbox_id: str, state: str, limit: float = 60) -> None:
    deadline = time.monotonic() + limit
    while Sandbox.get_info(sandbox_id).state.value != state:
        assert time.monotonic() < deadline, f"{sandbox_id} never became {state}"
        time.sleep(0.2)


def test_a_filesystem_only_pause_keeps_the_files_and_reboots(server: Server) -> None:
    sandbox = Sandbox.create(timeout=120)
    try:
        boot = _prepare(sandbox)
        assert sandbox.pause(mode="filesystem")
        assert not sandbox.is_running()
        assert Sandbox.get_info(sandbox.sandbox_id).state.value == "paused"
        assert not sandbox.pause(mode="filesystem")  # already paused: the SDK's False (409)
        resumed = sandbox.connect(timeout=60)
        assert resumed.sandbox_id == sandbox.sandbox_id and resumed.is_running()
        _check_fresh_boot(resumed, boot)
        assert resumed.commands.run("echo works").stdout == "works\n"
    finally:
        Sandbox.kill(sandbox.sandbox_id)


def test_a_filesystem_only_snapshot_starts_fresh_sandboxes(server: Server) -> None:
    source = Sandbox.create(timeout=120)
    copy = None
    try:
        boot = _prepare(source)
        snapshot = source.create_snapshot(mode="filesystem")
        assert source.is_running()
        assert [p.cmd for p in source.commands.list()] == ["/bin/bash"]  # the source runs on
        source.files.write("/home/user/kept.txt", "changed after the snapshot")
        copy = Sandbox.create(snapshot.snapshot_id, timeout=60)
        _check_fresh_boot(copy, boot)
        assert Sandbox.delete_snapshot(snapshot.snapshot_id)
    finally:
        for sandbox in (source, copy):
            if sandbox is not None:
                Sandbox.kill(sandbox.sandbox_id)


def test_timeout_zero_pauses_or_ends_now(server: Server) -> None:
    """``set_timeout(0)``: with ``on_timeout`` pausing filesystem-only, the sandbox pauses at once
    and comes back rebooted; without a lifecycle, it ends."""
    sandbox = Sandbox.create(
        timeout=120, lifecycle={"on_timeout": {"action": "pause", "mode": "filesystem"}}
    )
    try:
        sandbox.files.write("/home/user/kept.txt", "persisted")
        boot = sandbox.files.read(BOOT_ID).strip()
        sandbox.set_timeout(0)
        _wait_state(sandbox.sandbox_id, "paused")
        with pytest.raises(e2b.SandboxNotRunningException):  # no auto-resume of a new boot
            sandbox.files.read("/home/user/kept.txt")
        resumed = sandbox.connect(timeout=60)
        assert resumed.files.read("/home/user/kept.txt") == "persisted"
        assert resumed.files.read(BOOT_ID).strip() != boot
    finally:
        Sandbox.kill(sandbox.sandbox_id)
    plain = Sandbox.create(timeout=120)
    plain.set_timeout(0)
    assert not plain.is_running()
    with pytest.raises(e2b.NotFoundException):
        Sandbox.get_info(plain.sandbox_id)


def test_a_command_keeps_its_remaining_timeout_across_a_pause(server: Server) -> None:
    """A command started with a timeout is still killed when it runs out after a (full) pause and
    resume, and the paused time does not count. Also: ``on_resume="reboot"`` of a full pause is
    refused, not turned into a memory restore."""
    sandbox = Sandbox.create(timeout=120)
    try:
        handle = sandbox.commands.run("sleep 600", background=True, timeout=15)
        started = time.monotonic()
        sandbox.pause()
        time.sleep(max(0.0, 17 - (time.monotonic() - started)))  # past its timeout, while paused
        resumed = sandbox.connect(timeout=60)
        assert handle.pid in [p.pid for p in resumed.commands.list()]  # the paused time is not counted
        deadline = time.monotonic() + 40
        while handle.pid in [p.pid for p in resumed.commands.list()]:
            assert time.monotonic() < deadline, "the command outlived its timeout"
            time.sleep(0.5)
        assert "sleep 600" not in _processes(resumed)
        resumed.pause()
        with pytest.raises(e2b.SandboxException, match="501"):
            Sandbox.connect(sandbox.sandbox_id, on_resume="reboot", timeout=60)
    finally:
        Sandbox.kill(sandbox.sandbox_id)


def test_the_code_interpreter_starts_afresh_after_a_filesystem_only_pause(server: Server) -> None:
    interpreter = pytest.importorskip("e2b_code_interpreter")
    sandbox = interpreter.Sandbox.create(timeout=120)
    try:
        assert (
            sandbox.run_code("x = 41; open('/home/user/cell.txt', 'w').write('from a cell')").error
            is None
        )
        sandbox.pause(mode="filesystem")
        resumed = interpreter.Sandbox.connect(sandbox.sandbox_id, timeout=60)
        assert resumed.files.read("/home/user/cell.txt") == "from a cell"
        gone = resumed.run_code("x")
        assert gone.error is not None and gone.error.name == "NameError"  # a new interpreter
        assert resumed.run_code("1 + 1").text == "2"
    finally:
        interpreter.Sandbox.kill(sandbox.sandbox_id)
