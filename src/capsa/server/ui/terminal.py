"""The dashboard's terminal: a WebSocket bridging xterm.js in the browser to a login shell in a PTY
of the sandbox, spawned through the library (``agent.exec(...).pty(rows, cols)``) as the E2B PTY of
:mod:`capsa.server.envd` is, as the sandbox's default account.

Protocol (``/ui/api/sandboxes/{id}/terminal``): binary frames both ways carry terminal bytes; the
browser may send a text frame ``{"type": "resize", "rows": R, "cols": C}`` (the shell gets
SIGWINCH); the server's last text frame is ``{"type": "exit", "reason": "..."}`` (the shell exited,
the sandbox was killed or paused, the session ended, a frame was refused) before it closes.

The handshake is refused (HTTP 403) without a valid session cookie, from a page of another origin
(a WebSocket handshake is not subject to CORS: the ``Origin`` check is what stops a page elsewhere
on the same *site*, such as a sandbox port exposed on a sibling host name, from riding the cookie),
or for a sandbox the session's tenant may not see. When the browser goes away the shell is killed:
a terminal never outlives its page.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.routing import BaseRoute, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

import capsa
from capsa.agent.exec import MAX_TERMINAL
from capsa.server import accounts
from capsa.server.api_error import ApiError
from capsa.server.entry import Entry
from capsa.server.redact import client_message
from capsa.server.ui.deps import UiDeps

log = logging.getLogger(__name__)

MAX_INPUT_FRAME = 64 << 10  # bytes of one keystroke/paste frame (terminal.js sends at most 16 KiB)
MAX_CONTROL_FRAME = 1 << 10  # a JSON control frame (resize)
MAX_INPUTS_PER_SECOND = 2000  # frames; a flood past it is refused, typing is far below it
WATCH_INTERVAL = 0.25  # seconds between looks at the sandbox's state (killed, paused)
SPAWN_TIMEOUT = 30.0
KILL_TIMEOUT = 5.0
DEFAULT_SIZE = (24, 80)
# a login shell: bash where the image has it, else sh (an imported OCI image may lack bash)
SHELL = ("/bin/sh", "-c", "command -v bash >/dev/null 2>&1 && exec bash -l; exec sh -l")
TERM = "xterm-256color"

# close codes (RFC 6455): policy violation, message too big, normal
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_NORMAL = 1000


class FrameRefused(Exception):
    """A browser frame the protocol does not allow; the session ends with ``code``."""

    def __init__(self, reason: str, code: int = CLOSE_POLICY) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


def parse_size(rows: object, cols: object) -> tuple[int, int]:
    """(rows, cols), each an integer from 1 to :data:`MAX_TERMINAL` (no bool, no float)."""
    for value in (rows, cols):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_TERMINAL:
            raise FrameRefused(f"rows and cols must be integers from 1 to {MAX_TERMINAL}")
    assert isinstance(rows, int) and isinstance(cols, int)
    return rows, cols


def parse_control(text: str) -> tuple[int, int]:
    """The size a text frame asks for; anything but a well-formed resize is refused."""
    if len(text.encode()) > MAX_CONTROL_FRAME:
        raise FrameRefused(f"a control frame is larger than {MAX_CONTROL_FRAME} bytes", CLOSE_TOO_BIG)
    try:
        message = json.loads(text)
    except ValueError:
        raise FrameRefused("a text frame must be a JSON control message") from None
    fields = set(message) if isinstance(message, dict) else set()
    if fields != {"type", "rows", "cols"} or message["type"] != "resize":
        raise FrameRefused('the only control message is {"type": "resize", "rows": R, "cols": C}')
    return parse_size(message["rows"], message["cols"])


def query_size(params: Mapping[str, str]) -> tuple[int, int]:
    """The initial size the page asks for (``?rows=R&cols=C``, what xterm fitted), or 24x80."""
    rows, cols = params.get("rows"), params.get("cols")
    if rows is None or cols is None:
        return DEFAULT_SIZE
    if not (rows.isdigit() and cols.isdigit() and len(rows) <= 6 and len(cols) <= 6):
        raise FrameRefused("rows and cols must be integers")
    return parse_size(int(rows), int(cols))


def same_origin(websocket: WebSocket) -> bool:
    """Whether the handshake's ``Origin`` names the host the browser connected to (scheme aside:
    behind a TLS-terminating proxy the page is https and the server sees http). A handshake
    without an ``Origin`` is refused too: every browser sends one."""
    origin, host = websocket.headers.get("origin"), websocket.headers.get("host")
    if not origin or not host:
        return False
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return False
    default = {"http": ":80", "https": ":443"}[parts.scheme]
    given = parts.netloc.lower().removesuffix(default)
    wanted = host.lower()
    return given in (wanted, wanted.removesuffix(default))


async def spawn_shell(entry: Entry, rows: int, cols: int) -> capsa.Process:
    """A login shell in a PTY of ``entry``'s sandbox, as its default account (``user``, or the
    agent's default where the image has none: :func:`capsa.server.accounts.as_account`), in that
    account's home, with the sandbox's environment."""
    builder = entry.vm.agent.exec(SHELL[0]).args(list(SHELL[1:])).pty(rows, cols)
    for key, value in {**entry.envs, "TERM": TERM}.items():
        builder = builder.env(key, value)

    async def spawn(account: str | None) -> capsa.Process:
        home = accounts.home_of(account) if account is not None else "/"
        chosen = builder.cwd(home)
        return await (chosen if account is None else chosen.user(account)).spawn()

    async with asyncio.timeout(SPAWN_TIMEOUT):
        return await accounts.as_account(None, spawn)


def sandbox_gone(entry: Entry) -> str | None:
    """Why ``entry``'s terminal must end, if its sandbox can no longer serve it."""
    if entry.closing:
        return "the sandbox was killed"
    if entry.pausing or entry.paused is not None:
        return "the sandbox was paused"
    if not entry.running:
        return "the sandbox stopped"
    return None


@dataclass
class Bridge:
    """One browser's terminal: the shell's output to the socket, the socket's frames to the shell,
    and a watch on the sandbox; the first of the three to end ends the others."""

    websocket: WebSocket
    process: capsa.Process
    entry: Entry
    still_valid: Callable[[], bool]  # whether the page's session still holds

    async def run(self) -> None:
        tasks = {
            asyncio.create_task(self._output(), name="capsa-ui-terminal-out"),
            asyncio.create_task(self._input(), name="capsa-ui-terminal-in"),
            asyncio.create_task(self._watch(), name="capsa-ui-terminal-watch"),
        }
        reason, code = "the session ended", CLOSE_NORMAL
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            first = done.pop()
            try:
                reason = first.result()
            except FrameRefused as exc:
                reason, code = f"frame refused: {exc.reason}", exc.code
            except Exception as exc:  # the sandbox went away under the shell's streams
                reason = sandbox_gone(self.entry) or f"the terminal failed: {type(exc).__name__}"
                log.info("terminal of sandbox %s ended: %r", self.entry.id, exc)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._free()
        if reason != "disconnected":
            await send_exit(self.websocket, reason, code)

    async def _output(self) -> str:
        async def forward(stream: capsa.OutputStream) -> None:
            async for chunk in stream:
                await self.websocket.send_bytes(chunk)

        await asyncio.gather(forward(self.process.stdout), forward(self.process.stderr))
        gone = sandbox_gone(self.entry)
        if gone is not None:
            return gone
        code = await self.process.wait(KILL_TIMEOUT)
        return f"the shell exited (status {code})"

    async def _input(self) -> str:
        window_start, frames = asyncio.get_running_loop().time(), 0
        while True:
            try:
                message = await self.websocket.receive()
            except WebSocketDisconnect:
                return "disconnected"
            if message["type"] == "websocket.disconnect":
                return "disconnected"
            now = asyncio.get_running_loop().time()
            if now - window_start >= 1.0:
                window_start, frames = now, 0
            frames += 1
            if frames > MAX_INPUTS_PER_SECOND:
                raise FrameRefused(f"more than {MAX_INPUTS_PER_SECOND} frames in a second")
            data, text = message.get("bytes"), message.get("text")
            if data is not None:
                if len(data) > MAX_INPUT_FRAME:
                    raise FrameRefused(
                        f"an input frame is larger than {MAX_INPUT_FRAME} bytes", CLOSE_TOO_BIG
                    )
                await self.process.write_stdin(data)
            elif text is not None:
                rows, cols = parse_control(text)
                await self.process.resize(rows, cols)

    async def _watch(self) -> str:
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            gone = sandbox_gone(self.entry)
            if gone is not None:
                return gone
            if not self.still_valid():
                return "the dashboard session ended (logged out or expired)"

    async def _free(self) -> None:
        """Kill the shell (and what it started: its process group) unless it exited; with a
        paused sandbox this keeps it out of the snapshot when the kill wins the race."""
        if self.process.returncode is not None:
            return
        with contextlib.suppress(Exception):
            async with asyncio.timeout(KILL_TIMEOUT):
                await self.process.kill()
                await self.process.wait()


async def send_exit(websocket: WebSocket, reason: str, code: int = CLOSE_NORMAL) -> None:
    """The last frame, which the page shows ("session ended: reason"), then the close."""
    with contextlib.suppress(Exception):
        await websocket.send_text(json.dumps({"type": "exit", "reason": reason}))
        await websocket.close(code)


def routes(deps: UiDeps) -> list[BaseRoute]:
    async def terminal(websocket: WebSocket) -> None:
        session = deps.sessions.session_of(websocket)
        if session is None or not same_origin(websocket) or deps.streams.full():
            await websocket.close(CLOSE_POLICY)  # before accept: the handshake gets a 403
            return
        try:
            entry = deps.registry.find(websocket.path_params["sandbox_id"], session.principal.scope)
            rows, cols = query_size(websocket.query_params)
        except (ApiError, FrameRefused):
            await websocket.close(CLOSE_POLICY)
            return
        gone = sandbox_gone(entry)
        try:
            process = None if gone is not None else await spawn_shell(entry, rows, cols)
        except Exception as exc:  # no shell to run (or the sandbox went away meanwhile)
            gone = sandbox_gone(entry) or f"the shell did not start: {client_message(exc)}"
            process = None
        if process is None:
            await websocket.accept()
            await send_exit(websocket, gone or "the sandbox stopped")
            return
        try:
            await websocket.accept()
        except BaseException:
            with contextlib.suppress(Exception):
                await process.kill(timeout=KILL_TIMEOUT)
            raise
        log.info("terminal opened on sandbox %s (pid %s)", entry.id, process.pid)

        def session_holds() -> bool:  # not logged out, not expired
            return deps.sessions.session_of(websocket) is not None

        with deps.streams.track("terminal"):
            await Bridge(websocket, process, entry, session_holds).run()
        log.info("terminal closed on sandbox %s", entry.id)

    return [WebSocketRoute("/ui/api/sandboxes/{sandbox_id}/terminal", terminal)]
