"""How a sandbox's run ends for the server, apart from a kill: why a VM stopped on its own
(:func:`end_of`), and the shutdown's pause of every running sandbox (:func:`pause_all`)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

from capsa.server.entry import Entry, now

log = logging.getLogger(__name__)


def end_of(entry: Entry) -> tuple[str, str]:
    """``(reason, detail)`` of a sandbox whose VM stopped on its own: its lifetime (the E2B
    timeout), or the guest, whose console's tail says how."""
    vm = entry.vm
    if getattr(vm, "lifetime_expired", False) or entry.end_at <= now():
        return "timeout", ""
    try:
        tail = str(vm.console.tail())
    except Exception:  # a remote (Ray) sandbox's console is on its node
        tail = ""
    return "guest_crashed", tail


async def pause_all(
    entries: Iterable[Entry], pause: Callable[[Entry], Awaitable[None]], seconds: float
) -> None:
    """At shutdown: ``pause`` every running local sandbox, all at once, within ``seconds``. Those
    not paused by then stay running (their pause is cancelled, which undoes it) for the caller to
    remove; a Ray node's sandboxes cannot be paused and are left to it too."""
    running = [e for e in entries if e.running and e.node_id is None]
    if not running:
        return
    started = time.monotonic()
    tasks = [asyncio.ensure_future(pause(e)) for e in running]
    _, late = await asyncio.wait(tasks, timeout=seconds)
    for task in late:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for entry, task in zip(running, tasks, strict=True):
        if task.cancelled() or task.exception() is not None:
            entry.resume_on_call = False
            why = "timed out" if task in late else repr(task.exception())
            log.warning("sandbox %s: pausing it at shutdown failed (%s)", entry.id, why)
    paused = sum(1 for e in running if e.paused is not None)
    log.info("shutdown: paused %d of %d running sandboxes in %.1fs", paused, len(running),
             time.monotonic() - started)  # fmt: skip
