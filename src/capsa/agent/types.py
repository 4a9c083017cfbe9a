"""Plain results returned by the agent API."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from capsa.errors import ExecFailedError

FileType = Literal["file", "dir", "symlink", "other"]


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    fstype: str
    options: str


@dataclass(frozen=True)
class GuestInfo:
    kernel_version: str
    hostname: str
    cpus: int
    memory_bytes: int
    mounts: tuple[Mount, ...]
    agent_version: str
    python_version: str
    uptime: float  # seconds since the guest kernel booted
    image: str | None = None  # the capsa.Image the sandbox runs in (None: capsa's default root)


@dataclass(frozen=True)
class DirEntry:
    name: str
    type: FileType
    size: int
    mode: int  # permission bits, e.g. 0o644
    mtime: float


@dataclass(frozen=True)
class FileStat:
    path: str
    type: FileType
    size: int
    mode: int
    uid: int
    gid: int
    mtime: float
    target: str | None = None  # for a symlink stat'ed with follow_symlinks=False


@dataclass(frozen=True)
class DiskUsage:
    """The size of the guest filesystem holding a path, and what is used of it, in bytes."""

    path: str
    total: int
    used: int

    @property
    def free(self) -> int:
        return self.total - self.used


@dataclass(frozen=True)
class ProcessInfo:
    """A process the guest agent started and still keeps (``vm.agent.processes()``): running, or
    exited with its status not yet collected. ``attach(pid)`` gets a handle to it."""

    pid: int
    argv: tuple[str, ...]  # as the guest reports it: at most 64 words of 256 characters
    pty: bool
    started: float  # the guest's clock (seconds since the epoch) when it was started
    attached: bool  # bound to a handle of this connection (a ``spawn()`` or an ``attach``)
    running: bool
    exit_code: int | None = None  # once exited: its status (128 + signal if a signal killed it)
    signal: int | None = None


@dataclass(frozen=True)
class ExecResult:
    """Outcome of ``exec(...).run()``. ``stdout``/``stderr`` are decoded as UTF-8 (undecodable bytes
    become U+FFFD); the exact bytes are in ``stdout_bytes``/``stderr_bytes``."""

    argv: tuple[str, ...]
    exit_code: int  # the child's exit status, or 128 + signal number if a signal killed it
    stdout_bytes: bytes
    stderr_bytes: bytes
    signal: int | None = None
    duration: float = 0.0

    @property
    def stdout(self) -> str:
        return self.stdout_bytes.decode("utf-8", errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_bytes.decode("utf-8", errors="replace")

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def check(self) -> ExecResult:
        """This result if the command exited 0; else raises :class:`ExecFailedError` with its argv,
        exit code and output (``exec(...).run()`` itself never raises for an exit status)."""
        if self.exit_code == 0:
            return self
        raise ExecFailedError(
            f"{' '.join(self.argv)[:200]} exited with {self.exit_code}",
            argv=self.argv,
            exit_code=self.exit_code,
            stdout=self.stdout,
            stderr=self.stderr,
        )
