"""``capsa serve`` stops cleanly: SIGTERM kills its sandboxes and leaves no QEMU or runtime dir."""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

import pytest

from capsa._paths import runtime_base
from tests.server.conftest import API_KEY, start_server

e2b = pytest.importorskip("e2b")

pytestmark = [pytest.mark.vm, pytest.mark.timeout(120)]


def _qemu_pids(mark: bytes) -> list[int]:
    """QEMU processes started by the server: they inherit its environment, with ``mark`` in it
    (so that one leaked and re-parented to init is still found)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
                environ = (entry / "environ").read_bytes() if b"qemu-system" in cmdline else b""
            except OSError:
                continue
            if b"qemu-system" in cmdline and mark in environ:
                pids.append(int(entry.name))
    return pids


def test_sigterm_kills_sandboxes_and_cleans_up(tmp_path: Path) -> None:
    token = uuid.uuid4().hex
    mark = f"CAPSA_TEST_SERVE_MARK={token}".encode()
    server = start_server(tmp_path, "--pool", "base=1", env={"CAPSA_TEST_SERVE_MARK": token})
    marker = f"capsa-{server.process.pid}-"
    try:
        sandbox = e2b.Sandbox.create(
            timeout=300, api_key=API_KEY, api_url=server.url, sandbox_url=server.url
        )
        assert sandbox.commands.run("echo up").stdout == "up\n"
        assert _qemu_pids(mark), "the sandbox's QEMU should be running"
    finally:
        code = server.stop()
    assert code in (0, -signal.SIGTERM), server.log.read_text()[-2000:]
    assert "capsa serve stopping" in server.log.read_text()
    deadline = time.monotonic() + 5
    while _qemu_pids(mark) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _qemu_pids(mark)

    def leftovers() -> list[str]:  # the guardian removes the root just after the server exits
        return [p.name for p in runtime_base().iterdir() if p.name.startswith(marker)]

    deadline = time.monotonic() + 5
    while leftovers() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not leftovers()
    assert not os.path.exists(f"/proc/{server.process.pid}")


@pytest.mark.timeout(180)
def test_health_is_the_guests_answer_a_frozen_guest_is_not_running(tmp_path: Path) -> None:
    """envd's ``/health`` is answered inside the VM: a sandbox whose QEMU is frozen (SIGSTOP) must
    read as not running (``is_running()`` false on the 502), and as running once it thaws."""
    token = uuid.uuid4().hex
    mark = f"CAPSA_TEST_SERVE_MARK={token}".encode()
    server = start_server(tmp_path, env={"CAPSA_TEST_SERVE_MARK": token})  # no pool: one QEMU
    try:
        sandbox = e2b.Sandbox.create(
            timeout=300, api_key=API_KEY, api_url=server.url, sandbox_url=server.url
        )
        assert sandbox.is_running()
        deadline = time.monotonic() + 30
        while len(_qemu_pids(mark)) != 1 and time.monotonic() < deadline:  # the template's exits
            time.sleep(0.2)
        (qemu,) = _qemu_pids(mark)
        os.kill(qemu, signal.SIGSTOP)
        try:
            started = time.monotonic()
            assert not sandbox.is_running(request_timeout=60)
            assert time.monotonic() - started < 30
        finally:
            os.kill(qemu, signal.SIGCONT)
        assert sandbox.is_running(request_timeout=60)
        assert sandbox.commands.run("echo up").stdout == "up\n"
    finally:
        server.stop()
