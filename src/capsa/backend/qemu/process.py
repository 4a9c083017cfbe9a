"""Own one QEMU process: start it safely, wait for it, kill it exactly once, read its log."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from capsa._guardian import die_with_parent, libc
from capsa.errors import CapsaTimeoutError, ConfigError

log = logging.getLogger(__name__)

QEMU_BINARY = "qemu-system-x86_64"
# Everything QEMU may need to do on its own; spawn is denied so a compromised QEMU cannot exec.
SECCOMP = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


_PR_SET_THP_DISABLE = 41
_PR_SET_MEMORY_MERGE = 67
_ADDR_NO_RANDOMIZE = 0x0040000
# Opt-in: QEMU without address-space randomization, so that KSM can merge its relocated data and heap
# across sandboxes (docs/performance.md §Density). Never virtiofsd: it touches host files.
FIXED_LAYOUT_ENV = "CAPSA_QEMU_ASLR"


def no_huge_pages() -> Callable[[], None]:
    """A ``preexec_fn`` part: no transparent huge pages for the child (kept across exec). QEMU asks
    for them on its translation cache and RAM blocks, so an idle VM held whole 2 MiB pages it barely
    used: off, an idle sandbox takes ~2.6 MiB less for ~1-3% more CPU when busy (docs/performance.md
    §Density). Best effort: a kernel without the prctl leaves the default."""
    c = libc()

    def preexec() -> None:
        c.prctl(_PR_SET_THP_DISABLE, 1, 0, 0, 0)

    return preexec


def mergeable() -> Callable[[], None]:
    """A ``preexec_fn`` part: all of the child's anonymous memory may be merged by KSM
    (``PR_SET_MEMORY_MERGE``, Linux >= 6.4; kept across exec since 6.7). QEMU's own ``mem-merge``
    only marks guest RAM, the smallest part of an idle sandbox; this also offers the heaps, the
    relocated data of the binary and libraries and the translation caches, which are largely equal
    between sandboxes of one template. Harmless while KSM is off (``/sys/kernel/mm/ksm/run`` = 0, the
    default): nothing scans. Turning KSM on is the host owner's choice (docs/performance.md §Density,
    ``capsa doctor``). Best effort: an older kernel refuses the prctl and nothing changes."""
    c = libc()

    def preexec() -> None:
        c.prctl(_PR_SET_MEMORY_MERGE, 1, 0, 0, 0)

    return preexec


def fixed_layout_requested() -> bool:
    """``CAPSA_QEMU_ASLR=off``: start QEMU without ASLR. With KSM on, an idle sandbox's PSS fell from
    17.4 to 10.7 MiB at N=100 (the relocated data of QEMU and its libraries, pointers in its heap, are
    then equal in every sandbox) — at a security cost: a guest that found a memory-safety bug in QEMU
    no longer has to guess where anything is. Off by default; docs/performance.md §Density."""
    value = os.environ.get(FIXED_LAYOUT_ENV, "on").strip().lower()
    if value in ("on", "1", "yes", "true", ""):
        return False
    if value in ("off", "0", "no", "false"):
        return True
    raise ConfigError(
        f"{FIXED_LAYOUT_ENV}={value!r} is neither on nor off",
        hint=f"unset {FIXED_LAYOUT_ENV} (ASLR on, the default) or set it to off",
    )


def fixed_layout() -> Callable[[], None]:
    """A ``preexec_fn`` part: ``personality(ADDR_NO_RANDOMIZE)``, kept across exec."""
    c = libc()

    def preexec() -> None:
        current = c.personality(0xFFFFFFFF)  # query
        if current != -1:
            c.personality(current | _ADDR_NO_RANDOMIZE)

    return preexec


def find_qemu() -> str:
    path = shutil.which(QEMU_BINARY)
    if path is None:
        raise ConfigError(
            f"{QEMU_BINARY} not found on PATH",
            hint="install QEMU: apt-get install qemu-system-x86 (or run 'capsa doctor')",
        )
    return path


def read_tail(path: Path, max_lines: int = 40, max_bytes: int = 16384) -> str:
    """The last lines of a log file, tolerant of a missing file and of binary junk."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read()
    except OSError:
        return ""
    lines = data.decode(errors="replace").splitlines()
    return "\n".join(lines[-max_lines:])


class QemuProcess:
    """A started QEMU child. It dies with the forking thread (PDEATHSIG) and ignores terminal signals
    (own session), so only this object — or our death — ends it.

    Its exit is awaited through a pidfd on the event loop, not asyncio's child watcher: on Python 3.11
    that watcher parks one thread per child in ``waitpid``, and N sandboxes' threads (their stacks'
    mappings) made every later ``fork`` of the host process slower — building the 500th sandbox cost
    more than the 100th (docs/performance.md §Density). A library must not swap the process-wide
    watcher, so capsa waits on its own children itself; only a kernel without ``pidfd_open`` (< 5.3)
    falls back to a thread per child."""

    def __init__(self, proc: subprocess.Popen[bytes], log_path: Path, name: str = "QEMU") -> None:
        self._proc = proc
        self.log_path = log_path
        self.name = name
        loop = asyncio.get_running_loop()
        self._waiter: asyncio.Future[int] = loop.create_future()
        self._pidfd = -1
        try:
            self._pidfd = os.pidfd_open(proc.pid)
        except (OSError, AttributeError):
            thread = threading.Thread(target=self._wait_blocking, args=(loop,), daemon=True)
            thread.name = f"capsa-wait-{name}"
            thread.start()
        else:
            loop.add_reader(self._pidfd, self._reap, loop)

    def _reap(self, loop: asyncio.AbstractEventLoop) -> None:
        """The pidfd is readable: the child exited. Reap it (no zombie) and resolve ``exited``."""
        loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = -1
        try:
            code = self._proc.wait(timeout=5)  # already exited: returns at once
        except subprocess.TimeoutExpired:  # cannot happen once the pidfd is readable; never hang
            log.warning("%s (pid %d) ended but could not be reaped", self.name, self.pid)
            code = 255
        self._resolve(code)

    def _wait_blocking(self, loop: asyncio.AbstractEventLoop) -> None:
        code = self._proc.wait()
        with contextlib.suppress(RuntimeError):  # the loop closed first
            loop.call_soon_threadsafe(self._resolve, code)

    def _resolve(self, code: int) -> None:
        if not self._waiter.done():
            self._waiter.set_result(code)

    @classmethod
    async def start(
        cls,
        argv: Sequence[str],
        *,
        pass_fds: Sequence[int],
        log_path: Path,
        name: str = "QEMU",
        confine: Callable[[], None] | None = None,
    ) -> QemuProcess:
        """``confine`` runs in the child just before exec (virtiofsd's seccomp filter)."""
        log.debug("starting %s", " ".join(argv))
        die = die_with_parent()
        flat = no_huge_pages()
        merge = mergeable()
        is_qemu = Path(argv[0]).name == QEMU_BINARY
        fixed = fixed_layout() if is_qemu and fixed_layout_requested() else None

        def preexec() -> None:
            die()
            flat()
            merge()
            if fixed is not None:
                fixed()
            if confine is not None:
                confine()

        with log_path.open("ab") as log_file:
            # In the loop's thread like asyncio's create_subprocess_exec (a fork returns at once).
            proc = subprocess.Popen(  # noqa: ASYNC220
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                pass_fds=tuple(pass_fds),
                preexec_fn=preexec,  # noqa: PLW1509 - runs in the child before exec, by design
                start_new_session=True,
            )
        return cls(proc, log_path, name)

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    @property
    def exited(self) -> asyncio.Future[int]:
        """Resolves with the exit status when the process ends (negative: killed by that signal)."""
        return self._waiter

    async def wait(self, timeout: float | None) -> int:
        try:
            return await asyncio.wait_for(asyncio.shield(self._waiter), timeout)
        except TimeoutError:
            raise CapsaTimeoutError(
                f"{self.name} (pid {self.pid}) still running after {timeout}s"
            ) from None

    def kill(self) -> None:
        """Send SIGKILL if it is still running. Safe to call any number of times."""
        if self._waiter.done() or self._proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            if self._pidfd >= 0:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            else:
                self._proc.send_signal(signal.SIGKILL)

    async def kill_and_wait(self, timeout: float = 10.0) -> int:
        self.kill()
        return await self.wait(timeout)

    def log_tail(self, max_lines: int = 40) -> str:
        return read_tail(self.log_path, max_lines)
