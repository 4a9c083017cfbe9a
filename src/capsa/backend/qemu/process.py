"""Own one QEMU process: start it safely, wait for it, kill it exactly once, read its log."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import shutil
import signal
from collections.abc import Callable, Sequence
from pathlib import Path

from capsa._guardian import die_with_parent
from capsa._tasks import TaskSet
from capsa.errors import CapsaTimeoutError, ConfigError

log = logging.getLogger(__name__)

QEMU_BINARY = "qemu-system-x86_64"
# Everything QEMU may need to do on its own; spawn is denied so a compromised QEMU cannot exec.
SECCOMP = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


_PR_SET_THP_DISABLE = 41


def no_huge_pages() -> Callable[[], None]:
    """A ``preexec_fn`` part: no transparent huge pages for the child (kept across exec). QEMU asks
    for them on its translation cache and RAM blocks, so an idle VM held whole 2 MiB pages it barely
    used: off, an idle sandbox takes ~2.6 MiB less for ~1-3% more CPU when busy (docs/performance.md
    §Density). Best effort: a kernel without the prctl leaves the default."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

    def preexec() -> None:
        libc.prctl(_PR_SET_THP_DISABLE, 1, 0, 0, 0)

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
    (own session), so only this object — or our death — ends it."""

    def __init__(self, proc: asyncio.subprocess.Process, log_path: Path, name: str = "QEMU") -> None:
        self._proc = proc
        self.log_path = log_path
        self.name = name
        self._tasks = TaskSet(log)
        self._waiter: asyncio.Task[int] = self._tasks.spawn(proc.wait(), name=f"capsa-wait-{name}")

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

        def preexec() -> None:
            die()
            flat()
            if confine is not None:
                confine()

        with log_path.open("ab") as log_file:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                pass_fds=tuple(pass_fds),
                preexec_fn=preexec,
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
        if self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGKILL)

    async def kill_and_wait(self, timeout: float = 10.0) -> int:
        self.kill()
        return await self.wait(timeout)

    def log_tail(self, max_lines: int = 40) -> str:
        return read_tail(self.log_path, max_lines)
