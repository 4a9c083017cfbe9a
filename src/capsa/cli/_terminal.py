"""The local terminal in raw mode, for commands that attach it to a guest."""

from __future__ import annotations

import contextlib
import sys
import termios
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
