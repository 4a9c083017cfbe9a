"""envd, the in-sandbox API of E2B, served on the host: the ``process.Process`` service (commands)
and the ``filesystem.Filesystem`` service over Connect, mapped onto capsa's guest agent."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import posixpath
import signal as signals
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import capsa
from capsa._tasks import TaskSet
from capsa.agent.exec import MAX_TERMINAL
from capsa.errors import (
    CapsaError,
    GuestFileExistsError,
    GuestFileNotFoundError,
    GuestPermissionError,
    UnknownUserError,
)
from capsa.server import accounts
from capsa.server.connect import ConnectError
from capsa.server.limits import Limits
from capsa.server.redact import client_message

log = logging.getLogger(__name__)

HOME = "/home/user"
_SIGNALS = {"SIGNAL_SIGKILL": signals.SIGKILL, "SIGNAL_SIGTERM": signals.SIGTERM, 9: 9, 15: 15}
_READ_CHUNK = 1 << 16
KEEPALIVE = 30.0  # seconds of silence on a command's stream before a keepalive event
KEEPALIVE_RANGE = (1.0, 300.0)  # what a client's Keepalive-Ping-Interval header may ask for


def keepalive_interval(header: str | None) -> float:
    """The ``Keepalive-Ping-Interval`` header (seconds, what the SDKs send) within
    :data:`KEEPALIVE_RANGE`; :data:`KEEPALIVE` when absent or malformed."""
    if header is None or not header.strip().isdigit() or len(header) > 6:
        return KEEPALIVE
    low, high = KEEPALIVE_RANGE
    return min(max(float(header), low), high)


def resolve_guest_path(path: object, home: str = HOME) -> str:
    """An absolute guest path; relative ones are relative to the account's ``home``, as in E2B.
    It resolves and answers E2B's error; the rule a guest path must follow is checked once, by the
    agent client every call goes through (:func:`capsa.agent.errors.check_guest_path`)."""
    if not isinstance(path, str) or not path or "\0" in path:
        raise ConnectError("invalid_argument", f"a path must be a non-empty string, got {path!r:.60}")
    return posixpath.normpath(path if path.startswith("/") else f"{home}/{path}")


def map_error(exc: Exception, path: str = "") -> ConnectError:
    if isinstance(exc, ConnectError):
        return exc
    if isinstance(exc, UnknownUserError):
        return accounts.unknown_user(exc)
    if isinstance(exc, GuestFileNotFoundError):
        return ConnectError("not_found", f"path not found: {path}" if path else exc.message)
    if isinstance(exc, GuestFileExistsError):
        return ConnectError("already_exists", f"path already exists: {path}")
    if isinstance(exc, GuestPermissionError):
        return ConnectError("permission_denied", exc.message)
    return ConnectError("internal", client_message(exc))


# -- processes --


def pty_size(pty: object) -> tuple[int, int]:
    """(rows, cols) of a ``process.PTY`` message (``{"size": {"rows": r, "cols": c}}``)."""
    size = pty.get("size") if isinstance(pty, dict) else None
    rows = size.get("rows") if isinstance(size, dict) else None
    cols = size.get("cols") if isinstance(size, dict) else None
    for value in (rows, cols):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_TERMINAL:
            raise ConnectError(
                "invalid_argument", f"pty.size needs rows and cols from 1 to {MAX_TERMINAL}"
            )
    assert isinstance(rows, int) and isinstance(cols, int)
    return rows, cols


class HoldsProcesses(Protocol):
    """What :func:`processes_for` needs of a sandbox's entry (:class:`capsa.server.entry.Entry`),
    a protocol so that this module does not import the entry, which refers to :class:`ProcessTable`."""

    processes: ProcessTable | None

    @property
    def vm(self) -> capsa.Sandbox: ...

    @property
    def envs(self) -> dict[str, str]: ...


def processes_for(entry: HoldsProcesses, limits: Limits | None = None) -> ProcessTable:
    if entry.processes is None:
        entry.processes = ProcessTable(entry.vm, entry.envs, limits or Limits())
    return entry.processes


class Subscriber:
    """One stream's view of a command's output: at most ``limit`` events are buffered. The output
    pump waits for room (so a client that stops reading stops the pump, the agent's window fills
    and the guest process blocks on write: back-pressure, not server memory); the end of the
    output is always delivered. ``dropped`` is set when the pump gave up on this subscriber."""

    def __init__(self, limit: int) -> None:
        self._items: deque[dict[str, Any] | None] = deque()
        self._limit = limit
        self._changed = asyncio.Event()
        self.closed = False
        self.dropped = False
        self.error: ConnectError | None = None  # ends the stream after what is queued

    def fail(self, error: ConnectError) -> None:
        """End this stream with ``error`` once what is queued is read (the sandbox was paused)."""
        self.error = error
        self.closed = True
        self._changed.set()

    async def put(self, event: dict[str, Any], stall: float | None) -> None:
        """Append ``event`` once there is room; after ``stall`` seconds without room (None: wait
        as long as it takes) the subscriber is dropped instead."""
        while len(self._items) >= self._limit and not self.closed:
            self._changed.clear()
            try:
                async with asyncio.timeout(stall):
                    await self._changed.wait()
            except TimeoutError:
                self.dropped = self.closed = True
                self._changed.set()
                return
        if not self.closed:
            self._items.append(event)
            self._changed.set()

    def finish(self, event: dict[str, Any] | None) -> None:
        """Append the end of the output (past the limit: at most two events)."""
        self._items.append(event)
        self._changed.set()

    async def get(self) -> dict[str, Any] | None:
        while not self._items:
            if self.dropped:
                raise ConnectError(
                    "resource_exhausted",
                    "this stream fell too far behind the command's output and was dropped",
                )
            if self.error is not None:
                raise self.error
            self._changed.clear()
            await self._changed.wait()
        item = self._items.popleft()
        self._changed.set()
        if item is None and self.error is not None:
            raise self.error
        return item

    def close(self) -> None:
        self.closed = True
        self._changed.set()


@dataclass(eq=False)
class Proc:
    process: capsa.Process
    config: dict[str, Any]
    tag: str | None
    limits: Limits = field(default_factory=Limits)
    subscribers: set[Subscriber] = field(default_factory=set)
    end: dict[str, Any] | None = None
    pty: bool = False  # started in a pseudo-terminal: its output goes out as ``pty`` data
    # its timeout: the event-loop time it is killed at, or while paused the seconds it has left
    expires: float | None = None
    remaining: float | None = None

    def subscribe(self) -> Subscriber:
        sub = Subscriber(self.limits.stream_queue)
        if self.end is not None:
            sub.finish({"end": self.end})
            sub.finish(None)
        else:
            self.subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        sub.close()  # wakes the pump if it waits for this one
        self.subscribers.discard(sub)

    async def publish(self, event: dict[str, Any]) -> None:
        """Hand ``event`` to every subscriber, at the pace of the slowest: a lone subscriber is
        waited for as long as it takes (its command just runs slower), but when several are
        connected one that stays full for ``stream_stall`` seconds is dropped, so a stalled
        ``Connect`` cannot hold up the client that started the command."""
        stall = self.limits.stream_stall if len(self.subscribers) > 1 else None
        for sub in list(self.subscribers):
            await sub.put(event, stall)
            if sub.dropped:
                self.subscribers.discard(sub)

    def finish(self, event: dict[str, Any] | None) -> None:
        for sub in self.subscribers:
            sub.finish(event)

    def fail(self, error: ConnectError) -> None:
        """End every stream of this command with ``error`` once its buffered output is out."""
        for sub in list(self.subscribers):
            sub.fail(error)


class ProcessTable:
    """The commands started in one sandbox, by guest pid, with their output fanned out to every
    stream connected to them (``Start`` and ``Connect``)."""

    def __init__(self, vm: capsa.Sandbox, envs: dict[str, str], limits: Limits) -> None:
        self._vm = vm
        self._envs = envs
        self._limits = limits
        self._procs: dict[int, Proc] = {}
        self._tasks = TaskSet(log)
        self._deadlines = TaskSet(log)
        self._killed_because: str | None = None  # kill_all's reason, for the commands' end
        self._detached = False  # paused: the commands go on in the guest, nothing pumps them

    async def start(self, request: dict[str, Any], user: str | None = None) -> Proc:
        """Start the command of a ``Start`` request as the account ``user`` names (None: envd's
        default, see :mod:`capsa.server.accounts`)."""
        config = request.get("process") or {}
        if not isinstance(config, dict):
            raise ConnectError("invalid_argument", "process must be an object")
        cmd = config.get("cmd")
        if not isinstance(cmd, str) or not cmd:
            raise ConnectError("invalid_argument", "process.cmd is required")
        args, envs = config.get("args") or [], config.get("envs") or {}
        if not isinstance(args, list) or not isinstance(envs, dict):
            raise ConnectError("invalid_argument", "process.args must be a list, process.envs an object")
        tag = request.get("tag")
        if tag is not None and not isinstance(tag, str):
            raise ConnectError("invalid_argument", "tag must be a string")
        size = None if request.get("pty") is None else pty_size(request.get("pty"))
        try:
            builder = self._vm.agent.exec(cmd).args([str(a) for a in args])
        except CapsaError as exc:
            raise map_error(exc) from None
        if size is not None:
            builder = builder.pty(*size)
        for key, value in {**self._envs, **envs}.items():
            builder = builder.env(str(key), str(value))
        # as envd: by default in the account's home (every server sandbox has /home/user; relative
        # paths too)
        home = accounts.home_of(user)
        builder = builder.cwd(resolve_guest_path(config.get("cwd") or home, home))

        async def spawn(account: str | None) -> capsa.Process:
            return await (builder if account is None else builder.user(account)).spawn()

        try:
            process = await accounts.as_account(user, spawn)
        except Exception as exc:
            raise map_error(exc, str(config.get("cwd") or cmd)) from None
        if size is None and not request.get("stdin"):
            await process.close_stdin()  # a terminal's input stays open: it is how one types
        proc = Proc(process, config, tag, self._limits, pty=size is not None)
        self._procs[process.pid] = proc
        return proc

    def run(self, proc: Proc, deadline: float | None) -> None:
        """Start pumping ``proc``'s output (after the first subscriber is attached); kill it
        ``deadline`` seconds from now if it still runs (the command's timeout, whether or not its
        client is still connected)."""
        self._tasks.spawn(self._pump(proc), name=f"capsa-server-proc-{proc.process.pid}")
        if deadline is not None:
            proc.expires = asyncio.get_running_loop().time() + deadline
            self._deadlines.spawn(self._expire(proc, deadline), name="capsa-server-proc-deadline")

    async def _expire(self, proc: Proc, deadline: float) -> None:
        await asyncio.sleep(deadline)
        if proc.end is None:
            with contextlib.suppress(CapsaError):
                await proc.process.kill()

    async def _pump(self, proc: Proc) -> None:
        async def forward(stream: capsa.OutputStream, name: str) -> None:
            async for chunk in stream:  # the next chunk is read once every subscriber took this one
                await proc.publish({"data": {name: base64.b64encode(chunk).decode()}})

        try:
            await asyncio.gather(  # a terminal's output comes on stdout, its stderr stays empty
                forward(proc.process.stdout, "pty" if proc.pty else "stdout"),
                forward(proc.process.stderr, "stderr"),
            )
            code = await proc.process.wait()
            status = f"signal: {proc.process.signal}" if proc.process.signal else f"exit status {code}"
            proc.end = {"exitCode": code, "exited": proc.process.signal is None, "status": status}
            if self._killed_because is not None:
                proc.end["error"] = self._killed_because
        except Exception as exc:  # the sandbox went away
            error = client_message(exc)
            proc.end = {"exitCode": -1, "exited": False, "status": "error", "error": error}
        finally:
            if not self._detached:  # else reattach() takes it up again in the restored guest
                self._procs.pop(proc.process.pid, None)
                if proc.end is not None:
                    proc.finish({"end": proc.end})
                proc.finish(None)

    def find(self, selector: object) -> Proc:
        if isinstance(selector, dict):
            pid, tag = selector.get("pid"), selector.get("tag")
            if isinstance(pid, str) and pid.isdigit() and len(pid) < 12:
                pid = int(pid)
            for proc in self._procs.values():
                if (pid is not None and proc.process.pid == pid) or (
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
        requested = request.get("signal")
        sig = _SIGNALS.get(requested) if isinstance(requested, str | int) else None
        if sig is None:
            raise ConnectError("invalid_argument", f"unsupported signal {request.get('signal')!r}")
        await proc.process.kill(sig)

    async def send_input(self, request: dict[str, Any]) -> None:
        """Write ``input.stdin`` or ``input.pty`` (base64) to the command's input: a terminal's
        input is its stdin, so either reaches a PTY (``commands.send_stdin`` on a PTY's pid, as
        ``pty.send_stdin`` does) and a plain command alike."""
        proc = self.find(request.get("process"))
        given = request.get("input") or {}
        data = None
        if isinstance(given, dict):
            data = given.get("pty") if given.get("stdin") is None else given.get("stdin")
        if not isinstance(data, str):
            raise ConnectError("invalid_argument", "input.stdin or input.pty (base64) is required")
        try:
            raw = base64.b64decode(data, validate=True)
        except ValueError:
            raise ConnectError("invalid_argument", "input.stdin is not base64") from None
        try:
            await proc.process.write_stdin(raw)
        except CapsaError as exc:
            raise ConnectError("failed_precondition", exc.message) from None

    async def stream_input(self, messages: AsyncIterator[dict[str, Any]]) -> None:
        """``StreamInput``: a ``start`` naming the process, then ``data`` messages (each as
        :meth:`send_input` takes it) and ``keepalive``s, written in order as they arrive."""
        selector: object = None
        async for message in messages:
            if "start" in message:
                start = message["start"]
                if selector is not None or not isinstance(start, dict):
                    raise ConnectError("invalid_argument", "one start message first, naming the process")
                selector = start.get("process")
                self.find(selector)  # an unknown process fails now, not at its first input
            elif "data" in message:
                data = message["data"]
                if selector is None or not isinstance(data, dict):
                    raise ConnectError("invalid_argument", "input before the start message")
                await self.send_input({"process": selector, "input": data.get("input")})
            elif "keepalive" not in message:
                raise ConnectError("invalid_argument", f"unknown input message {sorted(message)!r:.80}")
        if selector is None:
            raise ConnectError("invalid_argument", "the input stream had no start message")

    async def update(self, request: dict[str, Any]) -> None:
        """Resize a PTY (``Update`` with ``pty.size``); the command gets SIGWINCH."""
        proc = self.find(request.get("process"))
        if request.get("pty") is None:
            return  # nothing to change
        rows, cols = pty_size(request.get("pty"))
        if not proc.pty:
            raise ConnectError("failed_precondition", "the process was not started with a PTY")
        try:
            await proc.process.resize(rows, cols)
        except CapsaError as exc:
            raise ConnectError("failed_precondition", exc.message) from None

    async def close_stdin(self, request: dict[str, Any]) -> None:
        await self.find(request.get("process")).process.close_stdin()

    async def kill_all(self, reason: str | None = None) -> None:
        """Kill every command and wait for them (before a snapshot); ``reason`` goes to their
        clients as the commands' error."""
        self._killed_because = reason
        for proc in list(self._procs.values()):
            with contextlib.suppress(CapsaError):
                await proc.process.kill()
        self._deadlines.cancel()
        await self._tasks.wait_all(10)  # the output pumps end with their process

    async def detach(self, reason: str) -> None:
        """Before a pause: stop pumping output (the commands go on in the guest, which keeps their
        output) and end the connected streams with ``reason``. Each command's timeout stops: what
        is left of it counts again from the resume (the guest is frozen meanwhile)."""
        self._detached = True
        self._tasks.cancel()
        self._deadlines.cancel()
        moment = asyncio.get_running_loop().time()
        for proc in self._procs.values():
            if proc.expires is not None:
                proc.remaining, proc.expires = max(0.0, proc.expires - moment), None
        await self._tasks.wait_all(10)
        for proc in self._procs.values():
            for sub in list(proc.subscribers):
                sub.fail(ConnectError("unavailable", reason))
            proc.subscribers.clear()

    async def reattach(self, vm: capsa.Sandbox) -> None:
        """After a resume (``vm`` restored from the pause's snapshot), or a failed pause (``vm`` the
        same): take up each command again through the agent; one that cannot be attached any more
        is dropped, logged."""
        same, self._vm, self._detached = vm is self._vm, vm, False
        for pid, proc in list(self._procs.items()):
            if proc.end is not None:
                self._procs.pop(pid, None)
                continue
            if not same:
                try:
                    proc.process = await vm.agent.attach(pid)
                except CapsaError as exc:
                    log.warning("command %d did not survive the pause: %s", pid, exc.message)
                    self._procs.pop(pid, None)
                    continue
            left, proc.remaining = proc.remaining, None
            self.run(proc, left)

    @property
    def limits(self) -> Limits:
        return self._limits

    def configs(self) -> dict[int, tuple[dict[str, Any], str | None]]:
        """Each command's config and tag, by guest pid (what a fork's copies are described by)."""
        return {pid: (proc.config, proc.tag) for pid, proc in self._procs.items()}

    async def adopt(self, info: capsa.ProcessInfo, config: dict[str, Any], tag: str | None) -> None:
        """Take up a process of the guest that this table did not start (a fork's copy)."""
        process = await self._vm.agent.attach(info.pid)
        proc = Proc(process, config, tag, self._limits, pty=info.pty)
        self._procs[info.pid] = proc
        self.run(proc, None)

    def close(self) -> None:
        """The sandbox is gone: its commands' streams end with ``unavailable`` (as envd's end
        when its sandbox is killed mid-command; the SDK then probes the sandbox and reports it
        gone) rather than as if the command had ended."""
        gone = ConnectError("unavailable", "the connection to the sandbox ended: the sandbox was killed")
        for proc in self._procs.values():
            proc.fail(gone)
        self._tasks.cancel()
        self._deadlines.cancel()


async def stream_process(
    proc: Proc,
    *,
    first: dict[str, Any] | None,
    deadline: float | None,
    on_timeout: Any,
    keepalive: float = KEEPALIVE,
) -> AsyncIterator[dict[str, Any]]:
    """The ``ProcessEvent``s of ``proc`` as Connect stream messages; raises ConnectError
    ``deadline_exceeded`` (after ``on_timeout()``) if ``deadline`` (seconds) passes first. A
    ``keepalive`` event goes out after every ``keepalive`` seconds without output, as envd does:
    a silent command's stream must not look dead to the client (Node's fetch aborts a response
    body that sends nothing for 5 minutes)."""
    queue = proc.subscribe()
    if first is not None:
        yield {"event": first}
    loop = asyncio.get_running_loop()
    until = None if deadline is None else loop.time() + deadline
    try:
        while True:
            wait = keepalive if until is None else min(until - loop.time(), keepalive)
            try:
                async with asyncio.timeout(wait):
                    event = await queue.get()  # cancel-safe: no event is lost to the timeout
            except TimeoutError:
                if until is None or loop.time() < until:
                    yield {"event": {"keepalive": {}}}
                    continue
                await on_timeout()
                raise ConnectError("deadline_exceeded", "the command timed out") from None
            if event is None:
                return
            yield {"event": event}
    finally:
        proc.unsubscribe(queue)
