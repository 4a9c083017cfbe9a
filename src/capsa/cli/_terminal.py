"""The local terminal in raw mode, for commands that attach it to a guest."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import termios
import threading
import tty
from collections.abc import Iterator


@contextlib.contextmanager
def raw_terminal() -> Iterator[None]:
    if not sys.stdin.isatty():
        yield
        return
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def stdin_chunks(name: str) -> asyncio.Queue[bytes]:
    """What arrives on stdin, chunk by chunk, ending with ``b""``. A daemon thread reads it (a blocked
    read must not keep capsa alive); the queue is bounded, so piped input is read only as fast as the
    guest takes it. Call from the event loop."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=4)

    def reader() -> None:
        fd = sys.stdin.fileno()
        while True:
            chunk = os.read(fd, 1 << 16)
            asyncio.run_coroutine_threadsafe(queue.put(chunk), loop).result()
            if not chunk:
                return

    threading.Thread(target=reader, name=name, daemon=True).start()
    return queue
