"""Cleanup that survives ``kill -9`` of the Python process.

Child processes (QEMU, later virtiofsd) die with us through ``PR_SET_PDEATHSIG``. Files cannot: so each
Python process that starts a VM puts all per-VM runtime dirs under one private root dir and starts one
tiny guardian, ``sh -c 'cat >/dev/null; rm -rf ROOT'``, whose stdin is a pipe whose only write end we
hold. When this process exits for any reason the kernel closes that end, ``cat`` sees EOF, and the
guardian removes the root. The guardian runs in its own session so a terminal's Ctrl-C does not take it
down early.

A process tree killed as a whole (Ray kills an actor's children with it; a container runtime kills a
cgroup) takes the guardian down too. So the creator also holds a lock on ``ROOT/.owner`` for life, and
each new root sweeps the roots in the same base whose lock nobody holds any more: a kernel-released
lock is proof that the owner is gone, whatever pid namespace it ran in.

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
import fcntl
import functools
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from capsa._paths import runtime_base

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
# Waits for EOF (this process gone), then removes the root; a second try because a dying QEMU may
# still add a file while the first one runs.
_GUARDIAN_SCRIPT = 'cat >/dev/null; rm -rf -- "$0" || { sleep 1; rm -rf -- "$0"; }'
OWNER_FILE = ".owner"  # in each root: locked by its creator for life
_ROOT_NAME = re.compile(r"capsa-\d+-[a-z0-9_]{8}")  # tempfile.mkdtemp(prefix="capsa-PID-")
_lock = threading.Lock()
_root: Path | None = None
_guardian_pid: int | None = None
_creator_pid: int | None = None  # the process that made ``_root``: the only one that may remove it


@functools.cache
def libc() -> ctypes.CDLL:
    """The C library, loaded once: ``find_library`` runs ``ldconfig -p`` (a process) at every call,
    and every VM start needs libc for its ``preexec_fn``."""
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def die_with_parent() -> Callable[[], None]:
    """A ``preexec_fn`` that makes the child get SIGKILL when the thread that forked it dies.

    The parent pid is captured before ``fork`` so that a parent dying between fork and prctl is seen.
    """
    parent = os.getpid()
    c = libc()

    def preexec() -> None:
        c.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def runtime_root() -> Path:
    """This process's private runtime root, created (with its guardian) on first use."""
    global _root, _guardian_pid, _creator_pid
    with _lock:
        if _root is not None and _root.exists() and _creator_pid == os.getpid():
            return _root
        base = runtime_base()
        root = Path(tempfile.mkdtemp(prefix=f"capsa-{os.getpid()}-", dir=base))
        owner = os.open(root / OWNER_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(owner, fcntl.LOCK_EX)
        _keep_open.append(owner)  # released by the kernel when this process dies
        sweep_orphaned_roots(base, keep=root)
        read_end, write_end = os.pipe()
        try:
            guardian = subprocess.Popen(
                ["sh", "-c", _GUARDIAN_SCRIPT, str(root)],
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


def sweep_orphaned_roots(base: Path, keep: Path | None = None) -> list[Path]:
    """Remove the runtime roots under ``base`` whose owner died along with its guardian (see the
    module): ours only (same uid, real directories), and only when their ``.owner`` lock is free."""
    removed: list[Path] = []
    try:
        entries = list(base.iterdir())
    except OSError:
        return removed
    for path in entries:
        if path == keep or not _ROOT_NAME.fullmatch(path.name):
            continue
        try:
            st = path.lstat()
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
                continue
            fd = os.open(path / OWNER_FILE, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue  # not a root of this scheme (or already gone)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # its owner is alive
        finally:
            os.close(fd)
        log.info("removing the runtime root %s: its process and guardian are gone", path)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


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
