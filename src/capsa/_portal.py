"""Run capsa's asyncio core from synchronous code.

Each synchronous VM handle owns one private event-loop thread (a "portal"). Owning it per VM, not per
process, keeps no global state and ties QEMU's lifetime to that thread: QEMU is forked from the loop
thread, so PR_SET_PDEATHSIG kills it if the thread — or the process — goes away.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class Portal:
    def __init__(self, name: str = "capsa-portal") -> None:
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._ready.wait()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(self._ready.set)
        self._loop.run_forever()
        # Cancel whatever is left so the loop closes without "Task was destroyed" noise.
        pending = asyncio.all_tasks(self._loop)
        for task in pending:
            task.cancel()
        if pending:
            self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self._loop.close()

    @property
    def closed(self) -> bool:
        return not self._thread.is_alive()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the portal's loop and block until it finishes; exceptions propagate."""
        if self.closed:
            coro.close()
            raise RuntimeError("this capsa handle is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except KeyboardInterrupt:
            future.cancel()
            raise

    def close(self) -> None:
        if not self.closed:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
