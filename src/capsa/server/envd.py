"""envd, the in-sandbox API of E2B, served on the host: the ``process.Process`` service (commands)
and the ``filesystem.Filesystem`` service over Connect, mapped onto capsa's guest agent."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import logging
import posixpath
import signal as signals
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import capsa
from capsa._tasks import TaskSet
from capsa.errors import CapsaError, GuestFileExistsError, GuestFileNotFoundError, GuestPermissionError
from capsa.server.connect import ConnectError

if TYPE_CHECKING:
    from capsa.server.registry import Entry

log = logging.getLogger(__name__)

HOME = "/home/user"
_SIGNALS = {"SIGNAL_SIGKILL": signals.SIGKILL, "SIGNAL_SIGTERM": signals.SIGTERM, 9: 9, 15: 15}
_READ_CHUNK = 1 << 16


def guest_path(path: object) -> str:
    """An absolute guest path; relative ones are relative to the user's home, as in E2B."""
    if not isinstance(path, str) or not path or "\0" in path:
        raise ConnectError("invalid_argument", f"a path must be a non-empty string, got {path!r:.60}")
    return posixpath.normpath(path if path.startswith("/") else f"{HOME}/{path}")


def map_error(exc: Exception, path: str = "") -> ConnectError:
    if isinstance(exc, ConnectError):
        return exc
    if isinstance(exc, GuestFileNotFoundError):
        return ConnectError("not_found", f"path not found: {path}" if path else exc.message)
    if isinstance(exc, GuestFileExistsError):
        return ConnectError("already_exists", f"path already exists: {path}")
    if isinstance(exc, GuestPermissionError):
        return ConnectError("permission_denied", exc.message)
    if isinstance(exc, CapsaError):
        return ConnectError("internal", exc.message)
    return ConnectError("internal", f"{type(exc).__name__}: {exc}")


# -- processes --


def processes_for(entry: Entry) -> ProcessTable:
    if entry.processes is None:
        entry.processes = ProcessTable(entry.vm, entry.envs)
    return entry.processes


@dataclass(eq=False)
class Proc:
    process: capsa.Process
    config: dict[str, Any]
    tag: str | None
    subscribers: set[asyncio.Queue[dict[str, Any] | None]] = field(default_factory=set)
    end: dict[str, Any] | None = None

    def subscribe(self) -> asyncio.Queue[dict[str, Any] | None]:
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        if self.end is not None:
            queue.put_nowait({"end": self.end})
            queue.put_nowait(None)
        else:
            self.subscribers.add(queue)
        return queue

    def publish(self, event: dict[str, Any] | None) -> None:
        for queue in self.subscribers:
            queue.put_nowait(event)


class ProcessTable:
    """The commands started in one sandbox, by guest pid, with their output fanned out to every
    stream connected to them (``Start`` and ``Connect``)."""

    def __init__(self, vm: capsa.Sandbox, envs: dict[str, str]) -> None:
        self._vm = vm
        self._envs = envs
        self._procs: dict[int, Proc] = {}
        self._tasks = TaskSet(log)
        self._deadlines = TaskSet(log)

    async def start(self, request: dict[str, Any]) -> Proc:
        config = request.get("process") or {}
        cmd = config.get("cmd")
        if not isinstance(cmd, str) or not cmd:
            raise ConnectError("invalid_argument", "process.cmd is required")
        builder = self._vm.agent.exec(cmd).args([str(a) for a in config.get("args") or []])
        for key, value in {**self._envs, **(config.get("envs") or {})}.items():
            builder = builder.env(str(key), str(value))
        if config.get("cwd"):
            builder = builder.cwd(guest_path(config["cwd"]))
        try:
            process = await builder.spawn()
        except Exception as exc:
            raise map_error(exc, str(config.get("cwd") or cmd)) from None
        if not request.get("stdin"):
            await process.close_stdin()
        proc = Proc(process, config, request.get("tag"))
        self._procs[process.pid] = proc
        return proc

    def run(self, proc: Proc, deadline: float | None) -> None:
        """Start pumping ``proc``'s output (after the first subscriber is attached); kill it
        ``deadline`` seconds from now if it still runs (the command's timeout, whether or not its
        client is still connected)."""
        self._tasks.spawn(self._pump(proc), name=f"capsa-server-proc-{proc.process.pid}")
        if deadline is not None:
            self._deadlines.spawn(self._expire(proc, deadline), name="capsa-server-proc-deadline")

    async def _expire(self, proc: Proc, deadline: float) -> None:
        await asyncio.sleep(deadline)
        if proc.end is None:
            with contextlib.suppress(CapsaError):
                await proc.process.kill()

    async def _pump(self, proc: Proc) -> None:
        async def forward(stream: capsa.OutputStream, name: str) -> None:
            async for chunk in stream:
                proc.publish({"data": {name: base64.b64encode(chunk).decode()}})

        try:
            await asyncio.gather(
                forward(proc.process.stdout, "stdout"), forward(proc.process.stderr, "stderr")
            )
            code = await proc.process.wait()
            status = f"signal: {proc.process.signal}" if proc.process.signal else f"exit status {code}"
            proc.end = {"exitCode": code, "exited": proc.process.signal is None, "status": status}
        except Exception as exc:  # the sandbox went away
            proc.end = {"exitCode": -1, "exited": False, "status": "error", "error": str(exc)}
        finally:
            self._procs.pop(proc.process.pid, None)
            if proc.end is not None:
                proc.publish({"end": proc.end})
            proc.publish(None)

    def find(self, selector: object) -> Proc:
        if isinstance(selector, dict):
            pid, tag = selector.get("pid"), selector.get("tag")
            for proc in self._procs.values():
                if (pid is not None and proc.process.pid == int(pid)) or (
                    tag is not None and proc.tag == tag
                ):
                    return proc
        raise ConnectError("not_found", f"process {selector!r:.80} not found")

    def list(self) -> list[dict[str, Any]]:
        rows = []
        for proc in self._procs.values():
            row: dict[str, Any] = {"config": proc.config, "pid": proc.process.pid}
            if proc.tag is not None:
                row["tag"] = proc.tag
            rows.append(row)
        return rows

    async def signal(self, request: dict[str, Any]) -> None:
        proc = self.find(request.get("process"))
        sig = _SIGNALS.get(request.get("signal"))
        if sig is None:
            raise ConnectError("invalid_argument", f"unsupported signal {request.get('signal')!r}")
        await proc.process.kill(sig)

    async def send_input(self, request: dict[str, Any]) -> None:
        proc = self.find(request.get("process"))
        data = (request.get("input") or {}).get("stdin")
        if data is None:
            raise ConnectError("invalid_argument", "only stdin input is supported")
        try:
            await proc.process.write_stdin(base64.b64decode(data))
        except CapsaError as exc:
            raise ConnectError("failed_precondition", exc.message) from None

    async def close_stdin(self, request: dict[str, Any]) -> None:
        await self.find(request.get("process")).process.close_stdin()

    async def kill_all(self) -> None:
        """Kill every command and wait for them (before a snapshot)."""
        for proc in list(self._procs.values()):
            with contextlib.suppress(CapsaError):
                await proc.process.kill()
        self._deadlines.cancel()
        await self._tasks.wait_all(10)  # the output pumps end with their process

    def close(self) -> None:
        self._tasks.cancel()
        self._deadlines.cancel()


async def stream_process(
    proc: Proc, *, first: dict[str, Any] | None, deadline: float | None, on_timeout: Any
) -> AsyncIterator[dict[str, Any]]:
    """The ``ProcessEvent``s of ``proc`` as Connect stream messages; raises ConnectError
    ``deadline_exceeded`` (after ``on_timeout()``) if ``deadline`` (seconds) passes first."""
    queue = proc.subscribe()
    if first is not None:
        yield {"event": first}
    loop = asyncio.get_running_loop()
    until = None if deadline is None else loop.time() + deadline
    try:
        while True:
            remaining = None if until is None else until - loop.time()
            try:
                async with asyncio.timeout(remaining):
                    event = await queue.get()
            except TimeoutError:
                await on_timeout()
                raise ConnectError("deadline_exceeded", "the command timed out") from None
            if event is None:
                return
            yield {"event": event}
    finally:
        proc.subscribers.discard(queue)


# -- filesystem --

_TYPES = {"file": "FILE_TYPE_FILE", "dir": "FILE_TYPE_DIRECTORY", "symlink": "FILE_TYPE_SYMLINK"}


def _permissions(kind: str, mode: int) -> str:
    prefix = {"dir": "d", "symlink": "l"}.get(kind, "-")
    bits = "".join(c if mode & (1 << (8 - i)) else "-" for i, c in enumerate("rwxrwxrwx"))
    return prefix + bits


def _time(seconds: float) -> str:
    stamp = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def entry_info(path: str, kind: str, size: int, mode: int, mtime: float) -> dict[str, Any]:
    info: dict[str, Any] = {
        "name": path.rstrip("/").rsplit("/", 1)[-1] or "/",
        "type": _TYPES.get(kind, "FILE_TYPE_UNSPECIFIED"),
        "path": path,
        "size": str(size),
        "mode": mode & 0o7777,
        "permissions": _permissions(kind, mode),
        "owner": "root",
        "group": "root",
        "modifiedTime": _time(mtime),
    }
    return info


class Filesystem:
    """``filesystem.Filesystem`` for one sandbox."""

    def __init__(self, vm: capsa.Sandbox) -> None:
        self._agent = vm.agent
        self._vm = vm

    async def stat(self, path: str) -> dict[str, Any]:
        try:
            st = await self._agent.stat(path, follow_symlinks=False)
        except Exception as exc:
            raise map_error(exc, path) from None
        info = entry_info(path, st.type, st.size, st.mode, st.mtime)
        if st.target is not None:
            info["symlinkTarget"] = st.target
        return info

    async def call(self, method: str, request: dict[str, Any]) -> dict[str, Any]:
        if method == "Stat":
            return {"entry": await self.stat(guest_path(request.get("path")))}
        if method == "MakeDir":
            path = guest_path(request.get("path"))
            if await self._agent.exists(path):
                raise ConnectError("already_exists", f"directory already exists: {path}")
            try:
                await self._agent.mkdir(path, parents=True)
            except Exception as exc:
                raise map_error(exc, path) from None
            return {"entry": await self.stat(path)}
        if method == "Remove":
            path = guest_path(request.get("path"))
            try:
                await self._agent.remove(path, recursive=True)
            except Exception as exc:
                raise map_error(exc, path) from None
            return {}
        if method == "Move":
            return {"entry": await self._move(request)}
        if method == "ListDir":
            path = guest_path(request.get("path"))
            depth = request.get("depth") or 1
            if not isinstance(depth, int) or depth < 1:
                raise ConnectError("invalid_argument", "depth must be at least 1")
            entries: list[dict[str, Any]] = []
            await self._list(path, depth, entries)
            return {"entries": entries}
        raise ConnectError("unimplemented", f"filesystem.Filesystem/{method} is not implemented")

    async def _list(self, path: str, depth: int, into: list[dict[str, Any]]) -> None:
        try:
            rows = await self._agent.list_dir(path)
        except Exception as exc:
            raise map_error(exc, path) from None
        for row in rows:
            child = f"{path.rstrip('/')}/{row.name}"
            into.append(entry_info(child, row.type, row.size, row.mode, row.mtime))
            if row.type == "dir" and depth > 1:
                await self._list(child, depth - 1, into)

    async def _move(self, request: dict[str, Any]) -> dict[str, Any]:
        source = guest_path(request.get("source"))
        destination = guest_path(request.get("destination"))
        if not await self._agent.exists(source):
            raise ConnectError("not_found", f"path not found: {source}")
        result = await self._agent.exec("mv").args(["-T", "--", source, destination]).timeout(60).run()
        if not result.ok:
            raise ConnectError("internal", f"rename failed: {result.stderr.strip()[:500]}")
        return await self.stat(destination)

    async def read(self, path: str) -> bytes:
        try:
            return await self._agent.read_file(path)
        except Exception as exc:
            raise map_error(exc, path) from None

    async def write(self, path: str, data: bytes) -> dict[str, Any]:
        try:
            try:
                await self._agent.write_file(path, data)
            except GuestFileNotFoundError:  # envd creates the parent directories
                parent = path.rsplit("/", 1)[0] or "/"
                await self._agent.mkdir(parent, parents=True)
                await self._agent.write_file(path, data)
        except Exception as exc:
            raise map_error(exc, path) from None
        return {"name": path.rsplit("/", 1)[-1], "type": "file", "path": path}
