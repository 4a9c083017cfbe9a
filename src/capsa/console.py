"""The VM's serial console (ttyS0) as an expect-style async API.

Bytes from the guest are appended to a transcript file as they arrive, decoded as UTF-8 (invalid bytes
replaced), and queued in a bounded buffer of unread text. ``wait_for`` consumes the buffer up to and
including a match; ``read_available`` drains it. If the guest floods the console faster than it is read,
the oldest unread text is dropped (it stays in the transcript) so host memory stays bounded.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
import re
import secrets
import socket
from collections.abc import Callable, Sequence
from pathlib import Path

from capsa._tasks import TaskSet
from capsa.errors import CapsaError, ConsoleTimeoutError, VMNotRunning

log = logging.getLogger(__name__)

Pattern = str | re.Pattern[str]

DEFAULT_BUFFER_LIMIT = 4 << 20  # characters of unread text kept in memory
TRANSCRIPT_LIMIT = 64 << 20  # bytes; a guest flooding its console must not fill the host disk
_TAIL_CHARS = 8192
_WRITE_TIMEOUT = 10.0


def _compile(pattern: Pattern) -> re.Pattern[str]:
    if isinstance(pattern, re.Pattern):
        return pattern
    if isinstance(pattern, str) and pattern:
        return re.compile(re.escape(pattern))
    raise TypeError("a console pattern is a non-empty str or a compiled re.Pattern")


_CRASH_MARKERS = ("Kernel panic", "BUG:", "Oops:", "general protection fault")
_CRASH_LOOKBACK = 100


class Console:
    """Serial console of one VM. Created by the VM; use it through ``vm.console``."""

    def __init__(
        self,
        sock: socket.socket,
        transcript: Path,
        *,
        buffer_limit: int = DEFAULT_BUFFER_LIMIT,
    ) -> None:
        sock.setblocking(False)
        self._sock = sock
        self.transcript_path = transcript
        self._transcript = transcript.open("ab", buffering=0)
        self._transcript_bytes = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""
        self._recent = ""
        self._limit = buffer_limit
        self._dropped = 0
        self._changed = asyncio.Event()
        self._eof = False
        self._exit_error: Callable[[], CapsaError] | None = None
        self._tasks = TaskSet(log)
        self._reader = self._tasks.spawn(self._read_loop(), name="capsa-console")

    # -- plumbing --

    async def _read_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                data = await loop.sock_recv(self._sock, 65536)
                if not data:
                    break
                self._feed(data)
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            self._feed(b"", final=True)
            self._eof = True
            self._changed.set()

    def _feed(self, data: bytes, final: bool = False) -> None:
        if data and not self._transcript.closed and self._transcript_bytes < TRANSCRIPT_LIMIT:
            chunk = data[: TRANSCRIPT_LIMIT - self._transcript_bytes]
            self._transcript.write(chunk)
            self._transcript_bytes += len(chunk)
            if self._transcript_bytes >= TRANSCRIPT_LIMIT:
                self._transcript.write(b"\n[capsa: transcript truncated at the size limit]\n")
        text = self._decoder.decode(data, final)
        if not text:
            return
        self._pending += text
        if len(self._pending) > self._limit:
            excess = len(self._pending) - self._limit
            self._dropped += excess
            self._pending = self._pending[excess:]
            log.warning("console buffer full: dropped %d unread characters", excess)
        self._recent = (self._recent + text)[-_TAIL_CHARS:]
        self._changed.set()

    def _mark_exited(self, error_factory: Callable[[], CapsaError]) -> None:
        """Called by the VM when QEMU exits: waiters get this error once the buffer has no match."""
        self._exit_error = error_factory
        self._changed.set()

    async def _close(self) -> None:
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)  # a failure was logged already
        self._sock.close()
        self._transcript.close()

    def tail(self, max_lines: int = 30) -> str:
        """The last lines the guest printed (read or not), for error messages. A kernel crash's call
        trace is longer than the window, so the tail then starts at the crash's first line."""
        lines = self._recent.replace("\r", "").splitlines()
        start = max(0, len(lines) - max_lines)
        for index in range(start - 1, max(-1, start - _CRASH_LOOKBACK), -1):
            if any(marker in lines[index] for marker in _CRASH_MARKERS):
                start = index
                break
        return "\n".join(lines[start:])

    @property
    def dropped_chars(self) -> int:
        """How many unread characters were discarded because the buffer was full."""
        return self._dropped

    # -- reading --

    async def wait_for(self, pattern: Pattern, timeout: float = 30.0) -> str:
        """Wait until ``pattern`` appears; return the unread text up to and including the match."""
        _, text = await self.wait_for_any([pattern], timeout)
        return text

    async def wait_for_any(self, patterns: Sequence[Pattern], timeout: float = 30.0) -> tuple[int, str]:
        """Wait for the earliest match of any pattern; return ``(index, text up to the match)``."""
        if not patterns:
            raise ValueError("wait_for_any needs at least one pattern")
        compiled = [_compile(p) for p in patterns]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            self._changed.clear()
            best: tuple[int, int, int] | None = None  # (end, start, index)
            for index, regex in enumerate(compiled):
                match = regex.search(self._pending)
                if match and (best is None or (match.end(), match.start()) < best[:2]):
                    best = (match.end(), match.start(), index)
            if best is not None:
                end, _, index = best
                text, self._pending = self._pending[:end], self._pending[end:]
                return index, text
            if self._exit_error is not None:
                raise self._exit_error()
            remaining = deadline - loop.time()
            if remaining <= 0:
                shown = " | ".join(p.pattern for p in compiled)
                raise ConsoleTimeoutError(
                    f"console pattern {shown!r} not seen within {timeout}s",
                    pattern=shown,
                    console_tail=self.tail(),
                    hint="check the console tail below; raise timeout= for slow (TCG) guests",
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def read_available(self, timeout: float = 0.05) -> str:
        """Return all unread text. If there is none, wait at most ``timeout`` seconds for some."""
        if not self._pending and not self._eof:
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout)
        elif not self._pending:
            # The console has ended: still yield, so a caller polling in a loop cannot starve the
            # event loop (and with it the task that records QEMU's exit).
            await asyncio.sleep(min(timeout, 0.01))
        text, self._pending = self._pending, ""
        return text

    # -- writing --

    async def write(self, data: str | bytes, timeout: float = _WRITE_TIMEOUT) -> None:
        if self._exit_error is not None:
            raise VMNotRunning(f"cannot write to the console: {self._exit_error().message}")
        if self._eof:
            raise VMNotRunning("cannot write to the console: the VM is not running")
        payload = data.encode() if isinstance(data, str) else bytes(data)
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.sock_sendall(self._sock, payload), timeout)
        except TimeoutError:
            raise ConsoleTimeoutError(
                f"console write blocked for {timeout}s (guest not reading?)",
                pattern="",
                console_tail=self.tail(),
            ) from None
        except OSError as exc:
            raise VMNotRunning(f"console write failed: {exc}") from exc

    async def write_line(self, line: str, timeout: float = _WRITE_TIMEOUT) -> None:
        await self.write(line + "\n", timeout)

    async def send_interrupt(self) -> None:
        """Send Ctrl-C; a guest shell with the console as its controlling tty gets SIGINT."""
        await self.write(b"\x03")

    async def exec_line(self, command: str, timeout: float = 30.0) -> str:
        """Run ``command`` in the guest shell that owns the console; return its output.

        The command is bracketed by two echo markers whose *typed* form (``C""APSA…``) differs from
        their *printed* form, so the terminal's echo of the command line never matches. Output is
        returned with ``\\r\\n`` turned into ``\\n``. Needs a POSIX shell prompt on the console.
        """
        if "\n" in command or "\r" in command:
            raise ValueError("exec_line runs a single line; join commands with ';' or '&&'")
        token = secrets.token_hex(6)
        begin, end = f"CAPSA_B_{token}", f"CAPSA_E_{token}"
        await self.write_line(f'echo C""APSA_B_{token}; {command}; echo C""APSA_E_{token}')
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        await self.wait_for(re.compile(re.escape(begin) + r"\r?\n"), timeout)
        text = await self.wait_for(
            re.compile(re.escape(end) + r"\r?\n"), max(0.0, deadline - loop.time())
        )
        output = text[: text.rfind(end)].replace("\r\n", "\n")
        return output
