"""Cleanup that survives ``kill -9`` of the Python process.

Child processes (QEMU, later virtiofsd) die with us through ``PR_SET_PDEATHSIG``. Files cannot: so each
Python process that starts a VM puts all per-VM runtime dirs under one private root dir and starts one
tiny guardian, ``sh -c 'cat >/dev/null; rm -rf ROOT'``, whose stdin is a pipe whose only write end we
hold. When this process exits for any reason the kernel closes that end, ``cat`` sees EOF, and the
guardian removes the root. The guardian runs in its own session so a terminal's Ctrl-C does not take it
down early.

Only the process that created the root removes it. An ``os.fork()``ed child (a worker pool, a
daemonising tool) inherits the parent's state, ``atexit`` handlers and pipe: at fork, the child forgets
the parent's root, closes its copy of the guardian's pipe (so the parent's guardian still fires when the
parent dies) and makes a root of its own on first use.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from capsa._paths import runtime_base

_PR_SET_PDEATHSIG = 1
_lock = threading.Lock()
_root: Path | None = None
_guardian_pid: int | None = None
_creator_pid: int | None = None  # the process that made ``_root``: the only one that may remove it


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def die_with_parent() -> Callable[[], None]:
    """A ``preexec_fn`` that makes the child get SIGKILL when the thread that forked it dies.

    The parent pid is captured before ``fork`` so that a parent dying between fork and prctl is seen.
    """
    parent = os.getpid()
    libc = _libc()

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def runtime_root() -> Path:
    """This process's private runtime root, created (with its guardian) on first use."""
    global _root, _guardian_pid, _creator_pid
    with _lock:
        if _root is not None and _root.exists() and _creator_pid == os.getpid():
            return _root
        root = Path(tempfile.mkdtemp(prefix=f"capsa-{os.getpid()}-", dir=runtime_base()))
        read_end, write_end = os.pipe()
        try:
            guardian = subprocess.Popen(
                ["sh", "-c", 'cat >/dev/null; rm -rf -- "$0"', str(root)],
                stdin=read_end,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                close_fds=True,
            )
        finally:
            os.close(read_end)
        # The write end stays open (close-on-exec, never passed on) until this process exits.
        _keep_open.append(write_end)
        _root = root
        _guardian_pid = guardian.pid
        _creator_pid = os.getpid()
        atexit.register(_remove_root, root, _creator_pid)
        return root


_keep_open: list[int] = []


def _remove_root(root: Path, creator: int) -> None:
    if os.getpid() == creator:  # a forked child runs its parent's atexit handlers too
        shutil.rmtree(root, ignore_errors=True)


def _forget_parent_root() -> None:
    """In a freshly forked child: drop the parent's root and its guardian's pipe (see the module)."""
    global _root, _guardian_pid, _creator_pid, _lock
    _lock = threading.Lock()  # another thread may have held it at the fork
    _root = _guardian_pid = _creator_pid = None
    for fd in _keep_open:
        with contextlib.suppress(OSError):
            os.close(fd)
    _keep_open.clear()


os.register_at_fork(after_in_child=_forget_parent_root)


def new_vm_dir(prefix: str = "vm-") -> Path:
    """A fresh directory for one VM's sockets and logs, inside the guarded root."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir=runtime_root()))
