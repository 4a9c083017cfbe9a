"""``files.watch_dir``: envd's directory watchers, by polling the guest through the agent.

The agent has no inotify operation, so a watcher lists the directory (recursively if asked) every
:data:`POLL_INTERVAL` seconds and reports the differences as envd ``FilesystemEvent``s: a new path
is ``CREATE`` (then ``WRITE`` for a file that already has content, as inotify would have told
both), a gone one ``REMOVE``, a changed size or modification time ``WRITE``, changed
permissions ``CHMOD``. A rename shows as ``REMOVE`` then ``CREATE``; changes undone within one
interval are not seen. With ``includeEntry`` each event but ``REMOVE`` carries the entry's
type, size, mode and modification time as the poll saw them (``allowNetworkMounts`` changes
nothing: polling works the same on any filesystem). Served both ways the SDKs ask: the
``WatchDir`` stream (async SDK) and ``CreateWatcher``/``GetWatcherEvents``/``RemoveWatcher`` (sync
SDK; ``GetWatcherEvents`` polls once more before answering, so it reports every change made before
it was called).

Polling runs on the server's event loop, shared by every sandbox, so a sandbox's watchers are
bounded together (:class:`WatcherTable`): at most 16, tracking at most 20,000 paths, listing about
2,000 paths a second at most (a big tree is polled less often than every half second).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import weakref
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import capsa
from capsa._tasks import TaskSet
from capsa.errors import CapsaError
from capsa.server.connect import ConnectError
from capsa.server.envd import map_error, resolve_guest_path
from capsa.server.filesystem import entry_info

if TYPE_CHECKING:
    from capsa.server.entry import Entry

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.5  # seconds between two polls of a small tree
MAX_WATCHERS = 16  # per sandbox: WatchDir streams and CreateWatcher watchers together
MAX_ENTRIES = 20_000  # paths the watchers of one sandbox track together (more is refused)
LIST_RATE = 2_000  # paths per second a sandbox's watchers list together, about: polls space out
MAX_PENDING = 10_000  # events kept for GetWatcherEvents between two calls
KEEPALIVE = 30.0  # seconds between keepalive messages on a quiet WatchDir stream

_State = dict[str, tuple[str, int, float, int]]  # relative path -> (type, size, mtime, mode)


class Watcher:
    """One watched directory of one sandbox. Made by :meth:`WatcherTable.open`, which counts it
    against the sandbox's :data:`MAX_WATCHERS` while it lives."""

    def __init__(
        self, table: WatcherTable, path: str, recursive: bool, include_entry: bool = False
    ) -> None:
        self._table = table
        self._agent = table.vm.agent
        self.path = path
        self.recursive = recursive
        self.include_entry = include_entry  # events carry the entry's info (where it still exists)
        self._state: _State = {}
        self._lock = asyncio.Lock()

    @property
    def tracked(self) -> int:
        """How many paths the last poll found."""
        return len(self._state)

    async def _scan(self) -> _State:
        limit = MAX_ENTRIES - self._table.tracked_by_others(self)
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
            if len(state) > limit:
                raise ConnectError(
                    "resource_exhausted",
                    f"{self.path} has over {limit} entries to watch (the watchers of a sandbox "
                    f"track at most {MAX_ENTRIES} together)",
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
            entry = self._entry(name, now)
            if before is None or before[0] != now[0]:
                if before is not None:
                    events.append(_event(name, "REMOVE"))
                events.append(_event(name, "CREATE", entry))
                if now[0] == "file" and now[1] > 0:  # it was written after its creation
                    events.append(_event(name, "WRITE", entry))
            elif before[1:3] != now[1:3] and now[0] != "dir":
                events.append(_event(name, "WRITE", entry))
            elif before[3] != now[3]:
                events.append(_event(name, "CHMOD", entry))
        events += [_event(name, "REMOVE") for name in old if name not in state]
        return events

    def _entry(self, name: str, now: tuple[str, int, float, int]) -> dict[str, Any] | None:
        if not self.include_entry:
            return None
        kind, size, mtime, mode = now
        return entry_info(f"{self.path.rstrip('/')}/{name}", kind, size, mode, mtime)

    async def stream(self, deadline: float | None) -> AsyncIterator[dict[str, Any]]:
        """``WatchDirResponse`` messages: ``start``, then events until ``deadline`` (seconds).
        Polling stops, and the watcher's slot is freed, when the client goes away (the server
        stops iterating) or the watch ends."""
        try:
            yield {"start": {}}
            loop = asyncio.get_running_loop()
            until = None if deadline is None else loop.time() + deadline
            quiet_since = loop.time()
            while until is None or loop.time() < until:
                await asyncio.sleep(self._table.interval())
                events = await self.poll()
                for event in events:
                    yield {"filesystem": event}
                if events:
                    quiet_since = loop.time()
                elif loop.time() - quiet_since > KEEPALIVE:
                    quiet_since = loop.time()
                    yield {"keepalive": {}}
            raise ConnectError("deadline_exceeded", "the watch timed out")
        finally:
            self._table.release(self)


def _event(name: str, kind: str, entry: dict[str, Any] | None = None) -> dict[str, Any]:
    event: dict[str, Any] = {"name": name, "type": f"EVENT_TYPE_{kind}"}
    if entry is not None:
        event["entry"] = entry
    return event


class WatcherTable:
    """The watchers of one sandbox: its WatchDir streams and its ``CreateWatcher`` watchers, which
    poll in the background and keep their events until ``GetWatcherEvents`` takes them.

    Their cost to the host is bounded per sandbox: at most :data:`MAX_WATCHERS` of them, tracking
    at most :data:`MAX_ENTRIES` paths together, polled every :data:`POLL_INTERVAL` seconds or less
    often, so that together they list about :data:`LIST_RATE` paths a second at most."""

    def __init__(self, vm: capsa.Sandbox) -> None:
        self.vm = vm
        # every live watcher; a stream's leaves when the stream ends or is dropped unstarted
        self._live: weakref.WeakSet[Watcher] = weakref.WeakSet()
        self._watchers: dict[str, tuple[Watcher, list[dict[str, Any]]]] = {}
        self._failed: dict[str, ConnectError] = {}  # CreateWatcher watchers that stopped
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._taskset = TaskSet(log)

    async def open(self, path: str, recursive: bool, include_entry: bool = False) -> Watcher:
        """A started watcher, counted until :meth:`release` (or until it is dropped)."""
        if len(self._live) >= MAX_WATCHERS:
            raise ConnectError(
                "resource_exhausted",
                f"this sandbox already has {MAX_WATCHERS} directory watchers; stop one first",
            )
        watcher = Watcher(self, path, recursive, include_entry)
        self._live.add(watcher)
        try:
            await watcher.start()
        except BaseException:
            self._live.discard(watcher)
            raise
        return watcher

    def release(self, watcher: Watcher) -> None:
        self._live.discard(watcher)

    def tracked_by_others(self, watcher: Watcher) -> int:
        return sum(other.tracked for other in list(self._live) if other is not watcher)

    def interval(self) -> float:
        """Seconds between two polls of each watcher: the more paths they track, the longer."""
        tracked = sum(watcher.tracked for watcher in list(self._live))
        return max(POLL_INTERVAL, tracked / LIST_RATE)

    async def call(self, method: str, request: dict[str, Any]) -> dict[str, Any]:
        if method == "CreateWatcher":
            watcher = await self.open(
                resolve_guest_path(request.get("path")),
                bool(request.get("recursive")),
                bool(request.get("includeEntry")),
            )
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
            failed = self._failed.get(watcher_id)
            if failed is not None:
                raise failed
            watcher, pending = found
            pending += await watcher.poll()
            events = list(pending)
            pending.clear()
            return {"events": events}
        if method == "RemoveWatcher":
            self._forget(watcher_id)
            return {}
        raise ConnectError("unimplemented", f"filesystem.Filesystem/{method} is not implemented")

    def _forget(self, watcher_id: str) -> None:
        watcher, _ = self._watchers.pop(watcher_id)
        self._failed.pop(watcher_id, None)
        self.release(watcher)
        task = self._tasks.pop(watcher_id, None)
        if task is not None:
            task.cancel()

    async def _run(self, watcher_id: str) -> None:
        while watcher_id in self._watchers:
            await asyncio.sleep(self.interval())
            watcher, pending = self._watchers[watcher_id]
            try:
                events = await watcher.poll()
            except ConnectError as exc:
                if exc.code == "resource_exhausted":  # grew past the limit: stop polling it
                    self._failed[watcher_id] = exc
                    self._tasks.pop(watcher_id, None)
                    return
                log.debug("watcher %s: %s", watcher_id, exc.message)  # the directory went away:
                continue  # keep trying, as envd would
            pending += events
            del pending[:-MAX_PENDING]

    def close(self) -> None:
        self._watchers.clear()
        self._live.clear()
        self._taskset.cancel()


def watchers_for(entry: Entry) -> WatcherTable:
    table = entry.extra.get("watchers")
    if table is None:
        table = entry.extra["watchers"] = WatcherTable(entry.vm)
    assert isinstance(table, WatcherTable)
    return table
