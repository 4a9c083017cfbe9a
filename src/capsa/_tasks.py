"""Background tasks that never lose their errors.

``asyncio.ensure_future`` keeps only a weak reference to a task and drops its exception unless
someone awaits it: a crashed background loop (a pool's filler, a flow's relay) then fails silently.
:class:`TaskSet` holds strong references to what it starts, logs every failure on its owner's logger
with the traceback, and can hand the error to a callback so the owner may fail visibly (record it,
stop serving, wake a waiter).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

ErrorHandler = Callable[[BaseException], None]


class TaskSet:
    """The background tasks of one owner. ``spawn`` starts one; ``cancel`` stops them all."""

    def __init__(self, logger: logging.Logger, on_error: ErrorHandler | None = None) -> None:
        self._log = logger
        self._on_error = on_error
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, T], *, name: str | None = None) -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if error is None:
            return
        self._log.error("background task %s failed: %r", task.get_name(), error, exc_info=error)
        if self._on_error is not None:
            try:
                self._on_error(error)
            except Exception:
                self._log.exception("error handler of task %s failed", task.get_name())

    def cancel(self) -> None:
        for task in list(self._tasks):
            if task is not asyncio.current_task():
                task.cancel()

    async def wait_all(self, timeout: float | None = None) -> None:
        """Wait up to ``timeout`` seconds for the running tasks to end (their failures are logged
        already, so nothing is raised here); tasks still running then are left alone."""
        current = asyncio.current_task()
        tasks = [task for task in self._tasks if task is not current]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

    def __len__(self) -> int:
        return len(self._tasks)
