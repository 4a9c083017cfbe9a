"""QMP control of one QEMU, over a socketpair handed to QEMU at start (no socket path, no race)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Any

from qemu.qmp import QMPClient
from qemu.qmp.error import QMPError
from qemu.qmp.qmp_client import ExecuteError

from capsa._tasks import TaskSet
from capsa.errors import BackendError

log = logging.getLogger(__name__)


class Monitor:
    """Thin wrapper over ``qemu.qmp.QMPClient`` that records the guest's last SHUTDOWN reason and
    turns QMP failures into :class:`BackendError`."""

    def __init__(self, name: str) -> None:
        self._client = QMPClient(name)
        self.shutdown_reason: str | None = None
        self._events: asyncio.Task[None] | None = None
        self._tasks = TaskSet(log)
        self._closed = False

    async def connect(self, sock: socket.socket, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._client.connect(sock), timeout)
        except (QMPError, OSError, TimeoutError) as exc:
            raise BackendError(f"QMP handshake with QEMU failed: {exc}") from exc
        self._events = self._tasks.spawn(self._watch_events(), name="capsa-qmp-events")

    async def _watch_events(self) -> None:
        try:
            async for event in self._client.events:
                if event["event"] == "SHUTDOWN":
                    data: Any = event.get("data")
                    reason = data.get("reason") if isinstance(data, dict) else None
                    self.shutdown_reason = str(reason or "unknown")
                    log.debug("QEMU SHUTDOWN event: %s", self.shutdown_reason)
        except (QMPError, OSError, EOFError):
            pass

    async def execute(
        self, command: str, args: dict[str, Any] | None = None, timeout: float = 10.0
    ) -> Any:
        try:
            return await asyncio.wait_for(self._client.execute(command, args), timeout)
        except ExecuteError as exc:  # QEMU refused the command: keep its error class
            raise BackendError(
                f"QMP command {command!r} failed: {exc.error_class}: {exc}",
                command=command,
                qmp_class=exc.error_class,
            ) from exc
        except (QMPError, OSError, EOFError, TimeoutError) as exc:
            raise BackendError(f"QMP command {command!r} failed: {exc!r}", command=command) from exc

    async def send_fd(self, fd: int, name: str, timeout: float = 10.0) -> None:
        """Hand QEMU an open file descriptor under ``name`` (SCM_RIGHTS + ``getfd``): QEMU runs with
        ``spawn=deny``, so it cannot open files itself through ``exec:`` URIs, and needs no path."""
        try:
            self._client.send_fd_scm(fd)
        except (QMPError, OSError) as exc:
            raise BackendError(f"passing a file descriptor to QEMU failed: {exc!r}") from exc
        await self.execute("getfd", {"fdname": name}, timeout)

    async def close(self) -> None:
        """Disconnect (idempotent). Awaiting ``disconnect()`` is what retrieves the error that ended
        qemu.qmp's reader and writer tasks (EOFError once QEMU has exited)."""
        if self._closed:
            return
        self._closed = True
        if self._events is not None:
            self._events.cancel()
            await asyncio.wait({self._events}, timeout=1.0)
        with contextlib.suppress(QMPError, OSError, EOFError, TimeoutError):
            await asyncio.wait_for(self._client.disconnect(), 5.0)
