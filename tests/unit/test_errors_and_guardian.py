"""Error formatting and the kill -9 cleanup guardian (no VM)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import capsa
from capsa import _guardian


def test_error_tree_and_hints() -> None:
    error = capsa.ConfigError("bad cpus", hint="use 1..64")
    assert isinstance(error, capsa.CapsaError) and isinstance(error, ValueError)
    assert str(error) == "bad cpus\n  hint: use 1..64"
    timeout = capsa.ConsoleTimeoutError("late", pattern="x", console_tail="last line")
    assert isinstance(timeout, TimeoutError) and isinstance(timeout, capsa.CapsaTimeoutError)
    assert "last line" in str(timeout)
    exited = capsa.VMExited("exited", exit_code=-9, console_tail="panic", qemu_log_tail="qemu said")
    assert exited.exit_code == -9 and "panic" in str(exited) and "qemu said" in str(exited)
    backend = capsa.BackendError("died", qemu_log_tail="oops")
    assert "oops" in str(backend)


def test_runtime_root_removed_after_sigkill(tmp_path: Path) -> None:
    code = (
        "from capsa import _guardian\n"
        "d = _guardian.new_vm_dir()\n"
        "(d / 'file').write_text('x')\n"
        "print(d, flush=True)\n"
        "import time; time.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    vm_dir = Path(child.stdout.readline().strip())
    assert (vm_dir / "file").exists()
    child.send_signal(signal.SIGKILL)
    child.wait(5)
    deadline = time.monotonic() + 5
    while vm_dir.parent.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not vm_dir.parent.exists()


def test_a_root_whose_owner_and_guardian_were_killed_is_swept(tmp_path: Path) -> None:
    """A whole process tree killed at once (Ray kills an actor's children with it) leaves the root
    behind; the next process's root removes it, and never the root of a process still alive."""
    code = (
        "import os, time\n"
        "from capsa import _guardian\n"
        "d = _guardian.new_vm_dir()\n"
        "(d / 'sock').write_text('x')\n"
        "print(d.parent, _guardian._guardian_pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path)}
    children = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]
    roots = []
    try:
        for child in children:
            assert child.stdout is not None
            root, guardian = child.stdout.readline().split()
            roots.append((Path(root), int(guardian)))
        dead_root, dead_guardian = roots[0]
        os.kill(dead_guardian, signal.SIGKILL)  # the tree dies together: the guardian first
        children[0].kill()
        children[0].wait(5)
        time.sleep(0.2)
        assert dead_root.exists()  # nobody was left to remove it
        assert _guardian.sweep_orphaned_roots(tmp_path) == [dead_root]
        assert not dead_root.exists()
        assert (roots[1][0]).exists()  # alive: kept
    finally:
        for child in children:
            child.kill()
            child.wait(5)
