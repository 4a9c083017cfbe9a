"""The host half of the code interpreter: one persistent Python process per sandbox, started
through the agent on first use, spoken to in JSON lines (see ``_interp_main.py``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol

import capsa
from capsa._tasks import TaskSet
from capsa.errors import CapsaError
from capsa.server._guest_interpreter import BOOTSTRAP, SOURCE

log = logging.getLogger(__name__)

START_TIMEOUT = 30.0
_LINE_LIMIT = 64 << 20
DEFAULT_CWD = "/home/user"


class InterpreterError(CapsaError):
    """The interpreter process failed or answered out of protocol."""


class Interpreter:
    def __init__(self, vm: capsa.Sandbox, envs: dict[str, str]) -> None:
        self._vm = vm
        self._envs = envs
        self._process: capsa.Process | None = None
        self._parked: capsa.Process | None = None  # its process while the sandbox is paused
        self._lock = asyncio.Lock()
        self._tasks = TaskSet(log)
        self.contexts: dict[str, dict[str, str]] = {
            "default": {"id": "default", "language": "python", "cwd": DEFAULT_CWD}
        }

    async def _ensure(self) -> capsa.Process:
        if self._process is not None and self._process.returncode is None:
            return self._process
        builder = self._vm.agent.exec("python3").args(["-u", "-c", BOOTSTRAP])
        for key, value in self._envs.items():
            builder = builder.env(key, value)
        process = await builder.spawn()
        await process.write_stdin(json.dumps(SOURCE).encode() + b"\n")
        async with asyncio.timeout(START_TIMEOUT):
            first = await process.stdout.readline(_LINE_LIMIT)
        if json.loads(first or b"{}").get("type") != "ready":
            await process.kill()
            raise InterpreterError(f"the interpreter did not start: {first[:200]!r}")
        self._process = process
        self._tasks.spawn(self._discard(process.stderr), name="capsa-interpreter-stderr")
        return process

    async def _discard(self, stream: capsa.OutputStream) -> None:
        """Read what the interpreter process writes to its file descriptors 1 and 2 directly (a
        child process's output, say): unread, it would eventually block the interpreter."""
        async for chunk in stream:
            log.debug("interpreter output outside a cell: %r", chunk[:200])

    async def warm(self) -> None:
        async with self._lock:
            await self._ensure()

    async def _request(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Send one request, yield its events until its ``end``. A caller that stops early (a
        client that went away) leaves the rest to be drained in the background, so the next
        request starts on a clean stream; the lock is held until then."""
        await self._lock.acquire()
        finished = False
        try:
            process = await self._ensure()
            await process.write_stdin(json.dumps(request).encode() + b"\n")
            while True:
                event = await self._next(process)
                if event.get("type") == "end":
                    finished = True
                    return
                yield event
        finally:
            if finished or self._process is None:
                self._lock.release()
            else:
                self._tasks.spawn(self._drain(self._process), name="capsa-interpreter-drain")

    async def _next(self, process: capsa.Process) -> dict[str, Any]:
        line = await process.stdout.readline(_LINE_LIMIT)
        if not line:
            self._process = None
            raise InterpreterError("the interpreter exited")
        event: dict[str, Any] = json.loads(line)
        return event

    async def _drain(self, process: capsa.Process) -> None:
        try:
            while (await self._next(process)).get("type") != "end":
                pass
        except Exception:
            self._process = None
        finally:
            self._lock.release()

    async def execute(
        self, code: str, context: str | None, env: dict[str, str] | None
    ) -> AsyncIterator[dict[str, Any]]:
        ctx = context or "default"
        if ctx not in self.contexts:
            raise InterpreterError(f"context {ctx!r} not found")
        async for event in self._request({"op": "exec", "ctx": ctx, "code": code, "env": env or {}}):
            yield event

    async def _simple(self, request: dict[str, Any]) -> None:
        async for _ in self._request(request):
            pass

    async def create_context(self, cwd: str | None, language: str | None) -> dict[str, str]:
        if language not in (None, "", "python"):
            raise InterpreterError(f"language {language!r} is not supported (only python)")
        ctx = {"id": secrets.token_hex(8), "language": "python", "cwd": cwd or DEFAULT_CWD}
        await self._simple({"op": "create", "ctx": ctx["id"], "cwd": ctx["cwd"]})
        self.contexts[ctx["id"]] = ctx
        return ctx

    async def set_env(self, envs: dict[str, str]) -> None:
        """Add ``envs`` to the interpreter's environment (the sandbox's create-time variables)."""
        self._envs = {**self._envs, **envs}
        if envs and self._process is not None:
            await self._simple({"op": "env", "env": envs})

    async def remove_context(self, context_id: str) -> None:
        if self.contexts.pop(context_id, None) is None:
            raise InterpreterError(f"context {context_id!r} not found")
        await self._simple({"op": "remove", "ctx": context_id})

    async def restart_context(self, context_id: str) -> None:
        if context_id not in self.contexts:
            raise InterpreterError(f"context {context_id!r} not found")
        await self._simple({"op": "restart", "ctx": context_id})

    async def stop(self) -> None:
        """Kill the interpreter process and wait until it has ended (its state is lost)."""
        process = self._process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(CapsaError):
            await process.kill()
        with contextlib.suppress(CapsaError, TimeoutError):
            async with asyncio.timeout(10):
                async with self._lock:  # a request in progress ends on the EOF
                    self._process = None
                    await process.stdout.read()
                    await process.wait()
        await self._tasks.wait_all(10)  # the stderr reader ends on its EOF

    @property
    def pid(self) -> int | None:
        """The guest pid of its process (running or parked for a pause), if it has one."""
        process = self._process or self._parked
        return process.pid if process is not None else None

    async def detach(self) -> None:
        """Before a pause: the process (and its variables) is kept by the snapshot; requests wait
        until :meth:`reattach`. One busy with a cell cannot be carried across: it is stopped."""
        if self._lock.locked():
            await self.stop()
            return
        await self._lock.acquire()
        self._tasks.cancel()
        await self._tasks.wait_all(10)
        self._parked, self._process = self._process, None

    async def reattach(self, vm: capsa.Sandbox) -> None:
        """After a resume (or a failed pause: ``vm`` unchanged): take the interpreter process up
        again. If that fails its state is lost (logged) and the next request starts a new one."""
        parked, self._parked = self._parked, None
        try:
            if parked is not None and vm is not self._vm:
                try:
                    parked = await vm.agent.attach(parked.pid)
                except CapsaError as exc:
                    log.warning("the interpreter did not survive the pause: %s", exc.message)
                    parked = None
            self._vm = vm
            if parked is not None:
                self._process = parked
                self._tasks.spawn(self._discard(parked.stderr), name="capsa-interpreter-stderr")
        finally:
            if self._lock.locked():
                self._lock.release()

    @contextlib.asynccontextmanager
    async def saving(self) -> AsyncIterator[int | None]:
        """Around a save of the running sandbox (a fork, ``create_snapshot``): requests wait until
        it is written, so the copy of the process in the save is between two cells, with nothing
        of an answer in flight; yields its pid, which a sandbox restored from the save takes up
        (:meth:`adopt`). A busy one (a cell running) is not waited for: yields None."""
        if self._lock.locked():
            yield None
            return
        async with self._lock:
            process = self._process
            yield process.pid if process is not None and process.returncode is None else None

    def state(self) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
        """Its environment and contexts, as a copy taken by :meth:`saving` starts with."""
        return dict(self._envs), {cid: dict(ctx) for cid, ctx in self.contexts.items()}

    @classmethod
    def adopt(
        cls,
        vm: capsa.Sandbox,
        process: capsa.Process,
        envs: Mapping[str, str],
        contexts: Mapping[str, dict[str, str]],
    ) -> Interpreter:
        """The interpreter of a sandbox restored from a save: ``process`` (attached in ``vm``) is
        the copy of the saved sandbox's, with its variables; ``envs`` and ``contexts`` are what
        that one had (:meth:`state`)."""
        interpreter = cls(vm, dict(envs))
        interpreter.contexts = {cid: dict(ctx) for cid, ctx in contexts.items()}
        interpreter._process = process
        interpreter._tasks.spawn(interpreter._discard(process.stderr), name="capsa-interpreter-stderr")
        return interpreter

    def close(self) -> None:
        self._process = None  # it dies with its sandbox
        self._tasks.cancel()


class HoldsInterpreter(Protocol):
    """What :func:`interpreter_for` needs of a sandbox's entry (:class:`capsa.server.entry.Entry`),
    a protocol so that this module does not import the entry, which refers to :class:`Interpreter`."""

    interpreter: Interpreter | None

    @property
    def vm(self) -> capsa.Sandbox: ...

    @property
    def envs(self) -> dict[str, str]: ...


def interpreter_for(entry: HoldsInterpreter) -> Interpreter:
    if entry.interpreter is None:
        entry.interpreter = Interpreter(entry.vm, entry.envs)
    return entry.interpreter
