"""``files.watch_dir``: envd's directory watchers, by polling the guest through the agent.

The agent has no inotify operation, so a watcher lists the directory (recursively if asked) every
:data:`POLL_INTERVAL` seconds and reports the differences as envd ``FilesystemEvent``s: a new path
is ``CREATE``, a gone one ``REMOVE``, a changed size or modification time ``WRITE``, changed
permissions ``CHMOD``. A rename shows as ``REMOVE`` then ``CREATE``; changes undone within one
interval are not seen. Served both ways the SDKs ask: the ``WatchDir`` stream (async SDK) and
``CreateWatcher``/``GetWatcherEvents``/``RemoveWatcher`` (sync SDK; ``GetWatcherEvents`` polls once
more before answering, so it reports every change made before it was called).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import capsa
from capsa._tasks import TaskSet
from capsa.errors import CapsaError
from capsa.server.connect import ConnectError
from capsa.server.envd import guest_path, map_error

if TYPE_CHECKING:
    from capsa.server.registry import Entry

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.5
MAX_ENTRIES = 20_000  # paths one watcher tracks (a bigger tree is refused)
MAX_PENDING = 10_000  # events kept for GetWatcherEvents between two calls
MAX_WATCHERS = 64  # per sandbox
KEEPALIVE = 30.0  # seconds between keepalive messages on a quiet WatchDir stream

_State = dict[str, tuple[str, int, float, int]]  # relative path -> (type, size, mtime, mode)


class Watcher:
    """One watched directory of one sandbox."""

    def __init__(self, vm: capsa.Sandbox, path: str, recursive: bool) -> None:
        self._agent = vm.agent
        self.path = path
        self.recursive = recursive
        self._state: _State = {}
        self._lock = asyncio.Lock()

    async def _scan(self) -> _State:
        state: _State = {}
        pending = [""]
        while pending:
            relative = pending.pop()
            directory = f"{self.path.rstrip('/')}/{relative}" if relative else self.path
            try:
                rows = await self._agent.list_dir(directory)
            except CapsaError as exc:
                if relative:  # a subdirectory removed while listing
                    continue
                raise map_error(exc, self.path) from None
            for row in rows:
                name = f"{relative}/{row.name}" if relative else row.name
                state[name] = (row.type, row.size, row.mtime, row.mode)
                if self.recursive and row.type == "dir":
                    pending.append(name)
            if len(state) > MAX_ENTRIES:
                raise ConnectError(
                    "resource_exhausted", f"{self.path} has over {MAX_ENTRIES} entries to watch"
                )
        return state

    async def start(self) -> None:
        try:
            info = await self._agent.stat(self.path)
        except CapsaError as exc:
            raise map_error(exc, self.path) from None
        if info.type != "dir":
            raise ConnectError("invalid_argument", f"path {self.path} is not a directory")
        self._state = await self._scan()

    async def poll(self) -> list[dict[str, Any]]:
        """The events since the last poll."""
        async with self._lock:
            state = await self._scan()
            old, self._state = self._state, state
        events = []
        for name, now in state.items():
            before = old.get(name)
            if before is None or before[0] != now[0]:
                if before is not None:
                    events.append(_event(name, "REMOVE"))
                events.append(_event(name, "CREATE"))
            elif before[1:3] != now[1:3] and now[0] != "dir":
                events.append(_event(name, "WRITE"))
            elif before[3] != now[3]:
                events.append(_event(name, "CHMOD"))
        events += [_event(name, "REMOVE") for name in old if name not in state]
        return events

    async def stream(self, deadline: float | None) -> AsyncIterator[dict[str, Any]]:
        """``WatchDirResponse`` messages: ``start``, then events until ``deadline`` (seconds)."""
        yield {"start": {}}
        loop = asyncio.get_running_loop()
        until = None if deadline is None else loop.time() + deadline
        quiet_since = loop.time()
        while until is None or loop.time() < until:
            await asyncio.sleep(POLL_INTERVAL)
            events = await self.poll()
            for event in events:
                yield {"filesystem": event}
            if events:
                quiet_since = loop.time()
            elif loop.time() - quiet_since > KEEPALIVE:
                quiet_since = loop.time()
                yield {"keepalive": {}}
        raise ConnectError("deadline_exceeded", "the watch timed out")


def _event(name: str, kind: str) -> dict[str, Any]:
    return {"name": name, "type": f"EVENT_TYPE_{kind}"}


class WatcherTable:
    """The ``CreateWatcher`` watchers of one sandbox: each polls in the background and keeps its
    events until ``GetWatcherEvents`` takes them."""

    def __init__(self, vm: capsa.Sandbox) -> None:
        self._vm = vm
        self._watchers: dict[str, tuple[Watcher, list[dict[str, Any]]]] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._taskset = TaskSet(log)

    async def call(self, method: str, request: dict[str, Any]) -> dict[str, Any]:
        if method == "CreateWatcher":
            if len(self._watchers) >= MAX_WATCHERS:
                raise ConnectError("resource_exhausted", f"at most {MAX_WATCHERS} watchers")
            watcher = Watcher(self._vm, guest_path(request.get("path")), bool(request.get("recursive")))
            await watcher.start()
            new_id = secrets.token_hex(8)
            self._watchers[new_id] = (watcher, [])
            self._tasks[new_id] = self._taskset.spawn(
                self._run(new_id), name=f"capsa-server-watcher-{new_id}"
            )
            return {"watcherId": new_id}
        watcher_id = str(request.get("watcherId"))
        found = self._watchers.get(watcher_id)
        if found is None:
            raise ConnectError("not_found", f"watcher {watcher_id!r:.40} not found")
        if method == "GetWatcherEvents":
            watcher, pending = found
            pending += await watcher.poll()
            events = list(pending)
            pending.clear()
            return {"events": events}
        if method == "RemoveWatcher":
            self._watchers.pop(watcher_id)
            self._tasks.pop(watcher_id).cancel()
            return {}
        raise ConnectError("unimplemented", f"filesystem.Filesystem/{method} is not implemented")

    async def _run(self, watcher_id: str) -> None:
        while watcher_id in self._watchers:
            await asyncio.sleep(POLL_INTERVAL)
            watcher, pending = self._watchers[watcher_id]
            try:
                events = await watcher.poll()
            except ConnectError as exc:  # the directory went away: keep trying, as envd would
                log.debug("watcher %s: %s", watcher_id, exc.message)
                continue
            pending += events
            del pending[:-MAX_PENDING]

    def close(self) -> None:
        self._watchers.clear()
        self._taskset.cancel()


def watchers_for(entry: Entry) -> WatcherTable:
    table = entry.extra.get("watchers")
    if table is None:
        table = entry.extra["watchers"] = WatcherTable(entry.vm)
    assert isinstance(table, WatcherTable)
    return table
