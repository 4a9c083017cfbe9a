"""Blocking twins of the agent API (``vm.agent`` of a :class:`capsa.sync.SyncSandbox`)."""

from __future__ import annotations

import signal as signals
from collections.abc import Iterator

from capsa._portal import Portal
from capsa.agent.client import DEFAULT_READ_LIMIT, DEFAULT_TIMEOUT, FILE_TIMEOUT, Agent
from capsa.agent.exec import ExecBuilder, OutputStream, Process
from capsa.agent.types import DirEntry, ExecResult, FileStat, GuestInfo


async def _next_chunk(stream: OutputStream) -> bytes | None:
    return await stream._stream.read()


class SyncOutputStream:
    """``for chunk in proc.stdout`` yields bytes as the guest produces them."""

    def __init__(self, portal: Portal, stream: OutputStream) -> None:
        self._portal = portal
        self._stream = stream

    def __iter__(self) -> Iterator[bytes]:
        while (chunk := self._portal.call(_next_chunk(self._stream))) is not None:
            yield chunk

    def read(self) -> bytes:
        return self._portal.call(self._stream.read())


class SyncProcess:
    def __init__(self, portal: Portal, process: Process) -> None:
        self._portal = portal
        self._process = process
        self.pid = process.pid
        self.argv = process.argv
        self.stdout = SyncOutputStream(portal, process.stdout)
        self.stderr = SyncOutputStream(portal, process.stderr)

    @property
    def returncode(self) -> int | None:
        return self._process.returncode

    @property
    def signal(self) -> int | None:
        return self._process.signal

    def write_stdin(self, data: bytes) -> None:
        self._portal.call(self._process.write_stdin(data))

    def close_stdin(self) -> None:
        self._portal.call(self._process.close_stdin())

    def kill(self, sig: int = signals.SIGKILL, timeout: float = 10.0) -> None:
        self._portal.call(self._process.kill(sig, timeout))

    def resize(self, rows: int, cols: int, timeout: float = 10.0) -> None:
        self._portal.call(self._process.resize(rows, cols, timeout))

    def terminate(self) -> None:
        self._portal.call(self._process.terminate())

    def wait(self, timeout: float | None = None) -> int:
        return self._portal.call(self._process.wait(timeout))


class SyncExecBuilder:
    def __init__(self, portal: Portal, builder: ExecBuilder) -> None:
        self._portal = portal
        self._builder = builder

    def _wrap(self, builder: ExecBuilder) -> SyncExecBuilder:
        return SyncExecBuilder(self._portal, builder)

    @property
    def argv(self) -> tuple[str, ...]:
        return self._builder.argv

    def arg(self, value: str) -> SyncExecBuilder:
        return self._wrap(self._builder.arg(value))

    def args(self, values: list[str] | tuple[str, ...]) -> SyncExecBuilder:
        return self._wrap(self._builder.args(values))

    def env(self, key: str, value: str) -> SyncExecBuilder:
        return self._wrap(self._builder.env(key, value))

    def cwd(self, path: str) -> SyncExecBuilder:
        return self._wrap(self._builder.cwd(path))

    def user(self, user: str) -> SyncExecBuilder:
        return self._wrap(self._builder.user(user))

    def stdin(self, data: bytes | str) -> SyncExecBuilder:
        return self._wrap(self._builder.stdin(data))

    def timeout(self, seconds: float) -> SyncExecBuilder:
        return self._wrap(self._builder.timeout(seconds))

    def pty(self, rows: int = 24, cols: int = 80) -> SyncExecBuilder:
        return self._wrap(self._builder.pty(rows, cols))

    def max_output(self, nbytes: int) -> SyncExecBuilder:
        return self._wrap(self._builder.max_output(nbytes))

    def run(self) -> ExecResult:
        return self._portal.call(self._builder.run())

    def spawn(self) -> SyncProcess:
        return SyncProcess(self._portal, self._portal.call(self._builder.spawn()))


class SyncAgent:
    """Blocking twin of :class:`capsa.Agent`."""

    def __init__(self, portal: Portal, agent: Agent) -> None:
        self._portal = portal
        self._agent = agent

    def ping(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._portal.call(self._agent.ping(timeout))

    def info(self, timeout: float = DEFAULT_TIMEOUT) -> GuestInfo:
        return self._portal.call(self._agent.info(timeout))

    def exec(self, program: str) -> SyncExecBuilder:
        return SyncExecBuilder(self._portal, self._agent.exec(program))

    def shutdown(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._portal.call(self._agent.shutdown(timeout))

    def read_file(
        self, path: str, *, timeout: float = FILE_TIMEOUT, limit: int = DEFAULT_READ_LIMIT
    ) -> bytes:
        return self._portal.call(self._agent.read_file(path, timeout=timeout, limit=limit))

    def write_file(
        self, path: str, data: bytes | str, *, mode: int = 0o644, timeout: float = FILE_TIMEOUT
    ) -> None:
        self._portal.call(self._agent.write_file(path, data, mode=mode, timeout=timeout))

    def list_dir(self, path: str, *, timeout: float = DEFAULT_TIMEOUT) -> list[DirEntry]:
        return self._portal.call(self._agent.list_dir(path, timeout=timeout))

    def stat(
        self, path: str, *, follow_symlinks: bool = True, timeout: float = DEFAULT_TIMEOUT
    ) -> FileStat:
        return self._portal.call(
            self._agent.stat(path, follow_symlinks=follow_symlinks, timeout=timeout)
        )

    def exists(self, path: str, *, timeout: float = DEFAULT_TIMEOUT) -> bool:
        return self._portal.call(self._agent.exists(path, timeout=timeout))

    def mkdir(
        self, path: str, *, parents: bool = False, mode: int = 0o755, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        self._portal.call(self._agent.mkdir(path, parents=parents, mode=mode, timeout=timeout))

    def remove(self, path: str, *, recursive: bool = False, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._portal.call(self._agent.remove(path, recursive=recursive, timeout=timeout))
