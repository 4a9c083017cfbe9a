"""``vm.agent.exec(program)``: an immutable command builder, running processes and their output."""

from __future__ import annotations

import asyncio
import contextlib
import signal as signals
import time
from dataclasses import dataclass, replace
from typing import Any, Protocol

from capsa.agent import wire
from capsa.agent.channel import Call, Channel
from capsa.agent.errors import agent_error, check_timeout, check_user
from capsa.agent.types import ExecResult
from capsa.errors import (
    AgentError,
    CapsaTimeoutError,
    ConfigError,
    ExecOutputLimitError,
    ExecTimeoutError,
    GuestFileNotFoundError,
    ProtocolError,
)

SPAWN_TIMEOUT = 30.0
KILL_GRACE = 5.0
DEFAULT_MAX_OUTPUT = 64 << 20
MAX_SIGNAL = 64  # SIGRTMAX on Linux
MAX_TERMINAL = 10_000  # rows or columns


@dataclass(frozen=True)
class ExecSpec:
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    cwd: str | None = None
    stdin: bytes | None = None
    timeout: float | None = None
    max_output: int = DEFAULT_MAX_OUTPUT
    pty: tuple[int, int] | None = None  # (rows, cols) of a pseudo-terminal, for interactive use
    user: str | None = None  # "name", "uid", "name:group" or "uid:gid"; None: the image's default


def _check_terminal(rows: object, cols: object) -> tuple[int, int]:
    for value in (rows, cols):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_TERMINAL:
            raise ConfigError(
                f"terminal rows and cols must be integers from 1 to {MAX_TERMINAL}, got {value!r:.40}"
            )
    return rows, cols  # type: ignore[return-value]


def _check_text(value: str, what: str) -> str:
    if not isinstance(value, str) or "\0" in value:
        raise ConfigError(f"{what} must be a string without NUL bytes, got {value!r}")
    return value


class ChunkSource(Protocol):
    """Where an :class:`OutputStream` reads from: a call's stream from the guest agent."""

    async def read(self) -> bytes | None: ...


class OutputStream:
    """A running process's stdout or stderr: ``async for chunk in proc.stdout`` yields bytes as the
    guest produces them. Unread output holds the process back (back-pressure), it is never lost.

    ``readline`` costs time linear in the bytes read however the guest splits them (a guest
    trickling a byte at a time must not make the host re-copy the line per byte: the host's event
    loop is shared by every sandbox), and memory bounded by its ``limit``."""

    def __init__(self, stream: ChunkSource) -> None:
        self._stream = stream
        self._buffer = bytearray()  # read from the stream, not yet returned
        self._scanned = 0  # how much of the buffer is known to hold no line end

    def __aiter__(self) -> OutputStream:
        return self

    async def __anext__(self) -> bytes:
        if self._buffer:
            data = bytes(self._buffer)
            self._buffer.clear()
            self._scanned = 0
            return data
        chunk = await self._stream.read()
        if chunk is None:
            raise StopAsyncIteration
        return chunk

    async def read(self) -> bytes:
        """Everything until the stream ends."""
        return b"".join([chunk async for chunk in self])

    async def readline(self, limit: int = 1 << 20) -> bytes:
        """The next line including its ``\n`` (less at the end of the stream), e.g. to wait for a
        server's "ready". A line longer than ``limit`` bytes raises ``ValueError`` and, as
        ``asyncio.StreamReader.readline`` does, is dropped: up to its line end if that has arrived,
        else what has arrived of it (the next call goes on from there)."""
        buffer = self._buffer
        while True:
            end = buffer.find(b"\n", self._scanned)
            if end >= 0 or len(buffer) > limit:
                break
            self._scanned = len(buffer)
            chunk = await self._stream.read()
            if chunk is None:
                line = bytes(buffer)
                buffer.clear()
                self._scanned = 0
                return line
            buffer += chunk
        if end < 0 or end >= limit:
            del buffer[: len(buffer) if end < 0 else end + 1]
            self._scanned = 0
            raise ValueError(f"no line end within {limit} bytes of output")
        line = bytes(buffer[: end + 1])
        del buffer[: end + 1]  # a bytearray drops a prefix without moving the rest
        self._scanned = 0
        return line


class Process:
    """A command started with ``spawn()``. ``stdout``/``stderr`` stream its output; ``write_stdin``
    feeds it; ``kill`` signals its process group; ``wait`` returns its exit code."""

    def __init__(
        self, call: Call, argv: tuple[str, ...], pid: int, *, stdin_open: bool | None = None
    ) -> None:
        self._call = call
        self.argv = argv
        self.pid = pid  # in the guest
        self.stdout = OutputStream(call.streams["stdout"])
        self.stderr = OutputStream(call.streams["stderr"])
        self.returncode: int | None = None
        self.signal: int | None = None
        self._stdin_open = "stdin" in call.credits if stdin_open is None else stdin_open

    @property
    def _channel(self) -> Channel:
        return self._call.channel

    async def write_stdin(self, data: bytes) -> None:
        """Send ``data`` to the process's stdin (waits while the guest is still catching up)."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise ConfigError(f"write_stdin takes bytes, not {type(data).__name__}")
        credit = self._call.credits.get("stdin")
        if credit is None or not self._stdin_open:
            raise AgentError("this process's stdin is closed", kind="stdin_closed")
        view = memoryview(bytes(data))
        while view:
            chunk = bytes(view[: wire.CHUNK])
            view = view[wire.CHUNK :]
            if not await credit.take(wire.cost(len(chunk)), self._call.end.done):
                raise AgentError("the process exited; its stdin is closed", kind="stdin_closed")
            await self._channel.send({"t": "data", "id": self._call.id, "s": "stdin", "d": chunk})

    async def close_stdin(self) -> None:
        if self._stdin_open and not self._call.end.done():
            self._stdin_open = False
            await self._channel.send({"t": "eof", "id": self._call.id, "s": "stdin"})

    async def kill(self, sig: int = signals.SIGKILL, timeout: float = 10.0) -> None:
        """Send ``sig`` to the process group (the command and what it started). No error if the
        process has already exited."""
        if isinstance(sig, bool) or not isinstance(sig, int) or not 1 <= sig <= MAX_SIGNAL:
            raise ConfigError(f"a signal must be a number from 1 to {MAX_SIGNAL}, got {sig!r:.40}")
        check_timeout(timeout)
        if self._call.end.done():
            return
        reply = await self._channel.request(
            "kill", {"target": self._call.id, "signal": int(sig)}, timeout
        )
        if not reply.get("ok"):
            err = reply.get("err")
            if isinstance(err, dict) and err.get("kind") == "unknown_target":
                return  # it exited meanwhile
            raise agent_error(err, f"kill {self.argv[0]}")

    async def resize(self, rows: int, cols: int, timeout: float = 10.0) -> None:
        """Change the terminal size of a command started with ``pty()`` (it gets SIGWINCH)."""
        rows, cols = _check_terminal(rows, cols)
        check_timeout(timeout)
        args = {"target": self._call.id, "rows": rows, "cols": cols}
        reply = await self._channel.request("resize", args, timeout)
        if not reply.get("ok"):
            raise agent_error(reply.get("err"), "resize")

    async def terminate(self) -> None:
        await self.kill(signals.SIGTERM)

    async def wait(self, timeout: float | None = None) -> int:
        """Wait for the process to exit; returns its exit code (128 + signal if killed)."""
        if timeout is not None:
            check_timeout(timeout)
        try:
            async with asyncio.timeout(timeout):
                end = await asyncio.shield(self._call.end)
        except TimeoutError:
            raise CapsaTimeoutError(f"{self.argv[0]!r} did not exit within {timeout}s") from None
        self._call.close()
        code, sig = end.get("code"), end.get("signal")
        if isinstance(sig, int) and not isinstance(sig, bool) and 0 < sig < 128:
            self.signal = sig
            self.returncode = 128 + sig
        elif isinstance(code, int) and not isinstance(code, bool) and 0 <= code <= 255:
            self.returncode = code
        else:
            raise ProtocolError(f"malformed exit status from the agent: {end!r:.200}")
        return self.returncode


class ExecBuilder:
    """Describe a command, then ``await .run()`` (collect its output) or ``await .spawn()`` (stream).

    The argv runs directly, without a shell: use ``exec("sh").args(["-c", "..."])`` for one.
    """

    def __init__(self, channel: Channel, spec: ExecSpec) -> None:
        self._channel = channel
        self._spec = spec

    def _with(self, **changes: Any) -> ExecBuilder:
        return ExecBuilder(self._channel, replace(self._spec, **changes))

    @property
    def argv(self) -> tuple[str, ...]:
        return self._spec.argv

    def arg(self, value: str) -> ExecBuilder:
        return self._with(argv=(*self._spec.argv, _check_text(value, "an argument")))

    def args(self, values: list[str] | tuple[str, ...]) -> ExecBuilder:
        if isinstance(values, str):
            raise ConfigError("args() takes a list of strings; use arg() for one")
        return self._with(argv=(*self._spec.argv, *(_check_text(v, "an argument") for v in values)))

    def env(self, key: str, value: str) -> ExecBuilder:
        if not isinstance(key, str) or not key or "=" in key or "\0" in key:
            raise ConfigError(f"invalid environment variable name {key!r}")
        return self._with(env=(*self._spec.env, (key, _check_text(value, "an environment value"))))

    def cwd(self, path: str) -> ExecBuilder:
        if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
            raise ConfigError(f"cwd must be an absolute guest path, got {path!r}")
        return self._with(cwd=path)

    def user(self, user: str) -> ExecBuilder:
        """Run as ``user`` ("name", "uid", "name:group" or "uid:gid", looked up in the guest's
        /etc/passwd and /etc/group): with its groups, its ``HOME``, ``USER`` and ``LOGNAME``, and
        (unless ``cwd`` is given) in its home. Default: root, or the ``User`` of the sandbox's
        image. An account the guest lacks raises :class:`~capsa.errors.UnknownUserError`."""
        return self._with(user=check_user(user))

    def stdin(self, data: bytes | str) -> ExecBuilder:
        """Feed ``data`` to the command's stdin, then close it (without it, stdin is /dev/null)."""
        if isinstance(data, str):
            data = data.encode()
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ConfigError("stdin takes bytes or str")
        return self._with(stdin=bytes(data))

    def timeout(self, seconds: float) -> ExecBuilder:
        """Kill the command (its whole process group) if it runs longer than this."""
        return self._with(timeout=check_timeout(seconds))

    def pty(self, rows: int = 24, cols: int = 80) -> ExecBuilder:
        """Run on a pseudo-terminal of this size (line editing, job control, Ctrl-C as \\x03):
        stdout carries the terminal's output, stderr stays empty. Resize with ``Process.resize``."""
        return self._with(pty=_check_terminal(rows, cols))

    def max_output(self, nbytes: int) -> ExecBuilder:
        """How much of stdout and of stderr ``run()`` keeps (default 64 MiB each); past it the
        command is killed and :class:`ExecOutputLimitError` raised."""
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0:
            raise ConfigError(f"max_output must be a positive integer, got {nbytes!r}")
        return self._with(max_output=nbytes)

    async def spawn(self) -> Process:
        """Start the command and return at once. Its stdin is a pipe (``write_stdin``,
        ``close_stdin``); if ``stdin(data)`` was given, that is written first and stdin closed."""
        process = await self._start(stdin=True)
        if self._spec.stdin is not None:
            await self._feed(process)
        return process

    async def run(self) -> ExecResult:
        """Run to completion and return its exit code and output."""
        spec = self._spec
        started = time.monotonic()
        process = await self._start(stdin=spec.stdin is not None)
        out, err = bytearray(), bytearray()
        try:
            async with asyncio.timeout(spec.timeout):
                feeder = asyncio.create_task(self._feed(process)) if spec.stdin is not None else None
                try:
                    await asyncio.gather(
                        _collect(process.stdout, out, spec.max_output),
                        _collect(process.stderr, err, spec.max_output),
                    )
                    code = await process.wait()
                finally:
                    if feeder is not None:
                        feeder.cancel()
                        with contextlib.suppress(asyncio.CancelledError, AgentError):
                            await feeder
        except TimeoutError:
            await _reap(process)
            raise ExecTimeoutError(
                f"{spec.argv[0]!r} ran past its {spec.timeout}s timeout and was killed",
                argv=list(spec.argv),
                timeout=spec.timeout or 0.0,
                stdout=bytes(out),
                stderr=bytes(err),
            ) from None
        except _OutputLimit:
            await _reap(process)
            raise ExecOutputLimitError(
                f"{spec.argv[0]!r} printed more than {spec.max_output} bytes and was killed",
                stdout=bytes(out),
                stderr=bytes(err),
                hint="raise the limit with .max_output(n), or stream with .spawn()",
            ) from None
        except BaseException:
            await _reap(process)
            raise
        return ExecResult(
            argv=spec.argv,
            exit_code=code,
            stdout_bytes=bytes(out),
            stderr_bytes=bytes(err),
            signal=process.signal,
            duration=time.monotonic() - started,
        )

    async def _feed(self, process: Process) -> None:
        assert self._spec.stdin is not None
        with contextlib.suppress(AgentError):
            await process.write_stdin(self._spec.stdin)
        await process.close_stdin()

    async def _start(self, *, stdin: bool) -> Process:
        spec = self._spec
        stdin = stdin or spec.pty is not None
        args: dict[str, Any] = {
            "argv": list(spec.argv),
            "env": dict(spec.env),
            "cwd": spec.cwd,
            "stdin": stdin,
        }
        if spec.pty is not None:
            args["pty"] = list(spec.pty)
        if spec.user is not None:
            args["user"] = spec.user
        call = await self._channel.call(
            "exec", args, in_streams=("stdout", "stderr"), out_streams=("stdin",) if stdin else ()
        )
        try:
            async with asyncio.timeout(SPAWN_TIMEOUT):
                reply = await call.response
        except TimeoutError:
            call.close()
            raise CapsaTimeoutError(
                f"the agent did not start {spec.argv[0]!r} in {SPAWN_TIMEOUT}s"
            ) from None
        except BaseException:
            call.close()
            raise
        if not reply["ok"]:
            call.close()
            raise _spawn_error(reply.get("err"), spec)
        pid = reply.get("pid")
        if not isinstance(pid, int) or isinstance(pid, bool):
            call.close()
            raise ProtocolError("the agent's exec reply has no pid")
        call.label = f"{spec.argv[0]!r} (pid {pid})"
        return Process(call, spec.argv, pid)


class _OutputLimit(Exception):
    pass


async def _collect(stream: OutputStream, into: bytearray, limit: int) -> None:
    async for chunk in stream:
        if len(into) + len(chunk) > limit:
            into += chunk[: limit - len(into)]
            raise _OutputLimit
        into += chunk


async def _reap(process: Process) -> None:
    """Kill a process we are abandoning and give the guest a moment to report its end."""
    with contextlib.suppress(Exception):
        await process.kill(signals.SIGKILL, timeout=KILL_GRACE)
        await process.wait(KILL_GRACE)
    process._call.close()


def _spawn_error(err: Any, spec: ExecSpec) -> Exception:
    error = agent_error(err, f"exec {spec.argv[0]}", user=spec.user)
    if isinstance(error, GuestFileNotFoundError):
        if spec.cwd is not None and error.path == spec.cwd:
            return GuestFileNotFoundError(
                f"exec {spec.argv[0]}: working directory {spec.cwd} does not exist in the guest",
                path=spec.cwd,
                kind=error.kind,
                errno=error.errno,
            )
        return GuestFileNotFoundError(
            f"exec: program {spec.argv[0]!r} not found in the guest",
            path=spec.argv[0],
            kind=error.kind,
            errno=error.errno,
            hint="give an absolute path, or install it in the image; exec runs argv without a shell",
        )
    return error
