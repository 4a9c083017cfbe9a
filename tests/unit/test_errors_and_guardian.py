"""Error formatting and the kill -9 cleanup guardian (no VM)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import capsa


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
