"""``vm.agent``: structured commands and file transfer through the guest agent."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from typing import Any

import msgpack

from capsa.agent import wire
from capsa.agent.attach import attach_process, list_processes
from capsa.agent.channel import Call, Channel
from capsa.agent.connections import ConnectionWriter, open_connection
from capsa.agent.errors import check_guest_path, check_mode, check_timeout, check_user, expect_ok
from capsa.agent.exec import ExecBuilder, ExecSpec, Process, _check_text
from capsa.agent.types import DirEntry, DiskUsage, FileStat, FileType, GuestInfo, Mount, ProcessInfo
from capsa.errors import AgentError, CapsaTimeoutError, ConfigError, ProtocolError, VMNotRunning

DEFAULT_TIMEOUT = 30.0
FILE_TIMEOUT = 300.0
DEFAULT_READ_LIMIT = 1 << 30
LIST_LIMIT = 64 << 20
_FILE_TYPES = ("file", "dir", "symlink", "other")


def _field(reply: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = reply.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ProtocolError(f"the agent's reply has a bad {key!r}: {value!r:.80}")
    return value


def _file_type(value: Any) -> FileType:
    if value not in _FILE_TYPES:
        raise ProtocolError(f"the agent sent an unknown file type {value!r:.40}")
    return value  # type: ignore[no-any-return]


class Agent:
    """Client of one guest agent. Every method takes ``timeout=`` (seconds)."""

    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        # Variables every exec gets unless it sets them itself (a sandbox's secret placeholders
        # and CA bundle paths: docs/secrets.md). Host-side: nothing of it is stored in the guest.
        self.default_env: tuple[tuple[str, str], ...] = ()

    @property
    def channel(self) -> Channel:
        return self._channel

    async def _request(
        self,
        op: str,
        args: dict[str, Any],
        timeout: float,
        path: str | None = None,
        *,
        user: str | None = None,
    ) -> dict[str, Any]:
        check_timeout(timeout)
        return expect_ok(await self._channel.request(op, args, timeout), op, path, user=user)

    # -- basics --

    async def ping(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        await self._request("ping", {}, timeout)

    async def wait_idle(self, timeout: float = DEFAULT_TIMEOUT) -> bool:
        """Wait until no request or file transfer is in flight (running processes do not count),
        at most ``timeout`` seconds; whether it is idle. A snapshot or fork refuses a busy agent at
        once: a caller that shares the sandbox with other work (a server) waits here first."""
        check_timeout(timeout)
        deadline = time.monotonic() + timeout
        while True:
            busy = [call.end for call in self._channel.unfinished_calls() if not call.label]
            left = deadline - time.monotonic()
            if not busy or left <= 0:
                return not busy
            # a bounded wait: a call closed without its end (cancelled) leaves the list, not its end
            await asyncio.wait(busy, timeout=min(left, 0.25), return_when=asyncio.FIRST_COMPLETED)

    async def info(self, timeout: float = DEFAULT_TIMEOUT) -> GuestInfo:
        reply = await self._request("info", {}, timeout)
        raw_mounts = _field(reply, "mounts", list)
        mounts = []
        for entry in raw_mounts[:10_000]:
            if not (
                isinstance(entry, list) and len(entry) == 4 and all(isinstance(x, str) for x in entry)
            ):
                raise ProtocolError("the agent sent a malformed mount entry")
            mounts.append(Mount(*entry))
        return GuestInfo(
            kernel_version=_field(reply, "kernel_version", str),
            hostname=_field(reply, "hostname", str),
            cpus=_field(reply, "cpus", int),
            memory_bytes=_field(reply, "memory_bytes", int),
            mounts=tuple(mounts),
            agent_version=_field(reply, "agent_version", str),
            python_version=_field(reply, "python_version", str),
            uptime=float(_field(reply, "uptime", (int, float))),
            image=reply["image"] if isinstance(reply.get("image"), str) else None,
        )

    def exec(self, program: str) -> ExecBuilder:
        """A command builder: ``await vm.agent.exec("ls").arg("/").run()``."""
        if not isinstance(program, str) or not program:
            raise ConfigError(f"exec needs a program name, got {program!r}")
        argv = (_check_text(program, "the program"),)
        return ExecBuilder(self._channel, ExecSpec(argv=argv, env=self.default_env))

    async def processes(self, timeout: float = DEFAULT_TIMEOUT) -> list[ProcessInfo]:
        """The processes the agent started that are still running, or exited and not yet collected
        (after a restore or a fork: the ones the snapshot captured, which go on running)."""
        return await list_processes(self._channel, timeout)

    async def attach(self, pid: int, timeout: float = DEFAULT_TIMEOUT) -> Process:
        """A handle to guest process ``pid`` (see :meth:`processes`), as ``spawn()`` returns: the
        output it wrote while no handle was attached comes first (the guest keeps up to 1 MiB per
        stream besides what was in flight; past that the process blocks on its output, nothing is
        lost), then live output. A process already attached to a handle raises AgentError."""
        return await attach_process(self._channel, pid, timeout)

    async def shutdown(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Ask the guest to power off. Returns once the agent has acknowledged; the VM then exits and
        every later call raises :class:`VMNotRunning`."""
        await self._request("shutdown", {}, timeout)
        self._channel.fail(VMNotRunning("the sandbox was shut down", hint="build a new sandbox"))

    async def refresh(
        self,
        hostname: str,
        network: dict[str, str] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        """Give the guest a new identity, as a restored or forked sandbox gets one: fresh entropy
        from the host's CSPRNG, the host's clock, the hostname ``hostname`` and, when ``network``
        is given (``vm.network.identity()``: the MAC and address the host side now uses), that
        link identity. The guest checks every argument before changing anything."""
        args: dict[str, object] = {"entropy": os.urandom(64), "time": time.time(), "hostname": hostname}
        if network is not None:
            args["network"] = network
        await self._request("refresh", args, timeout)

    async def open_connection(
        self, port: int, *, timeout: float = DEFAULT_TIMEOUT, first: bytes = b""
    ) -> tuple[asyncio.StreamReader, ConnectionWriter]:
        """A TCP connection to ``127.0.0.1:port`` inside the guest, carried by the agent (the guest
        needs no network for it): ``(reader, writer)`` as :func:`asyncio.open_connection` returns.
        ``first`` (up to 1 MiB) travels with the connect and is written as soon as it succeeds
        (a request head: one round trip less). Raises
        :class:`~capsa.agent.connections.ConnectionRefused` when nothing listens there."""
        return await open_connection(self._channel, port, timeout, first)

    # -- files --

    async def read_file(
        self, path: str, *, timeout: float = FILE_TIMEOUT, limit: int = DEFAULT_READ_LIMIT
    ) -> bytes:
        """The whole content of a guest file (streamed in chunks; ``limit`` bytes at most)."""
        check_guest_path(path)
        check_timeout(timeout)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ConfigError(f"limit must be a number of bytes, got {limit!r:.40}")
        call = await self._channel.call("read_file", {"path": path}, in_streams=("file",))
        try:
            async with asyncio.timeout(timeout):
                return await self._receive(call, "read_file", path, limit)
        except TimeoutError:
            raise CapsaTimeoutError(f"read_file {path} did not finish within {timeout}s") from None
        finally:
            await self._finish(call)

    async def _receive(self, call: Call, what: str, path: str, limit: int) -> bytes:
        expect_ok(await call.response, what, path)
        stream = call.streams["file"]
        parts: list[bytes] = []
        total = 0
        while (chunk := await stream.read()) is not None:
            total += len(chunk)
            if total > limit:
                raise AgentError(
                    f"{what} {path}: more than {limit} bytes",
                    kind="too_large",
                    hint="pass a larger limit= if you really want it in memory",
                )
            parts.append(chunk)
        if call.end.done():  # the guest failed mid-file (e.g. an I/O error) instead of ending it
            expect_ok(call.end.result(), what, path)
        return b"".join(parts)

    async def _finish(self, call: Call) -> None:
        """Forget a streaming call; tell the guest to stop if it has not ended."""
        if not call.end.done() and self._channel.failure is None:
            with contextlib.suppress(Exception):
                self._channel.post({"t": "cancel", "id": call.id})
        call.close()

    async def write_file(
        self,
        path: str,
        data: bytes | str,
        *,
        mode: int = 0o644,
        timeout: float = FILE_TIMEOUT,
        user: str | None = None,
    ) -> None:
        """Create or replace a guest file with ``data`` (streamed in chunks; any size). With
        ``user`` (a guest account, as ``exec().user()`` takes) the file is handed to that account
        (owner and group); the write itself is the agent's, so it is not limited by the account's
        permissions."""
        check_guest_path(path)
        check_timeout(timeout)
        check_mode(mode)
        args: dict[str, Any] = {"path": path, "mode": mode}
        if user is not None:
            args["user"] = check_user(user)
        if isinstance(data, str):
            data = data.encode()
        if not isinstance(data, bytes | bytearray | memoryview):
            raise ConfigError(f"write_file takes bytes or str, not {type(data).__name__}")
        view = memoryview(data)
        call = await self._channel.call("write_file", args, out_streams=("file",))
        try:
            async with asyncio.timeout(timeout):
                expect_ok(await call.response, "write_file", path, user=user)
                credit = call.credits["file"]
                offset = 0
                while offset < len(view):
                    chunk = bytes(view[offset : offset + wire.CHUNK])
                    if not await credit.take(wire.cost(len(chunk)), call.end.done):
                        break
                    await self._channel.send({"t": "data", "id": call.id, "s": "file", "d": chunk})
                    offset += len(chunk)
                if not call.end.done():
                    await self._channel.send({"t": "eof", "id": call.id, "s": "file"})
                expect_ok(await call.end, "write_file", path)
        except TimeoutError:
            raise CapsaTimeoutError(f"write_file {path} did not finish within {timeout}s") from None
        finally:
            await self._finish(call)

    async def list_dir(self, path: str, *, timeout: float = DEFAULT_TIMEOUT) -> list[DirEntry]:
        """Entries of a guest directory, sorted by name (without ``.`` and ``..``)."""
        check_guest_path(path)
        check_timeout(timeout)
        call = await self._channel.call("list_dir", {"path": path}, in_streams=("file",))
        try:
            async with asyncio.timeout(timeout):
                payload = await self._receive(call, "list_dir", path, LIST_LIMIT)
        except TimeoutError:
            raise CapsaTimeoutError(f"list_dir {path} did not finish within {timeout}s") from None
        finally:
            await self._finish(call)
        try:
            rows = msgpack.unpackb(payload, raw=False)
        except Exception as exc:
            raise ProtocolError(f"list_dir: malformed listing from the agent ({exc})") from None
        entries = []
        for row in rows if isinstance(rows, list) else [None]:
            if not (
                isinstance(row, list)
                and len(row) == 5
                and isinstance(row[0], str)
                and all(isinstance(x, int) for x in row[2:4])
                and isinstance(row[4], (int, float))
            ):
                raise ProtocolError("list_dir: malformed entry from the agent")
            entries.append(DirEntry(row[0], _file_type(row[1]), row[2], row[3], float(row[4])))
        return entries

    async def stat(
        self, path: str, *, follow_symlinks: bool = True, timeout: float = DEFAULT_TIMEOUT
    ) -> FileStat:
        check_guest_path(path)
        args = {"path": path, "follow": bool(follow_symlinks)}
        reply = await self._request("stat", args, timeout, path)
        target = reply.get("target")
        return FileStat(
            path=path,
            type=_file_type(reply.get("type")),
            size=_field(reply, "size", int),
            mode=_field(reply, "mode", int),
            uid=_field(reply, "uid", int),
            gid=_field(reply, "gid", int),
            mtime=float(_field(reply, "mtime", (int, float))),
            target=target if isinstance(target, str) else None,
        )

    async def disk_usage(self, path: str = "/", *, timeout: float = DEFAULT_TIMEOUT) -> DiskUsage:
        """The size of the guest filesystem holding ``path`` and what is used of it (``df``)."""
        check_guest_path(path)
        reply = await self._request("disk_usage", {"path": path}, timeout, path)
        total, free = _field(reply, "total", int), _field(reply, "free", int)
        if not 0 <= free <= total < 1 << 62:
            raise ProtocolError(f"the agent sent an impossible disk usage: {total} total, {free} free")
        return DiskUsage(path=path, total=total, used=total - free)

    async def exists(self, path: str, *, timeout: float = DEFAULT_TIMEOUT) -> bool:
        check_guest_path(path)
        reply = await self._request("exists", {"path": path}, timeout, path)
        return bool(_field(reply, "exists", bool))

    async def mkdir(
        self,
        path: str,
        *,
        parents: bool = False,
        mode: int = 0o755,
        timeout: float = DEFAULT_TIMEOUT,
        user: str | None = None,
    ) -> None:
        """Create a directory; with ``parents=True`` also its parents, and no error if it exists.
        With ``user`` (a guest account) each directory it creates is handed to that account."""
        check_guest_path(path)
        args: dict[str, Any] = {"path": path, "parents": bool(parents), "mode": check_mode(mode)}
        if user is not None:
            args["user"] = check_user(user)
        await self._request("mkdir", args, timeout, path, user=user)

    async def remove(
        self, path: str, *, recursive: bool = False, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        """Remove a file, symlink or empty directory; ``recursive=True`` removes a whole tree."""
        check_guest_path(path)
        await self._request("remove", {"path": path, "recursive": bool(recursive)}, timeout, path)


__all__ = ["Agent"]
