"""Save and load a VM's state with QEMU migration over a file descriptor capsa opened.

QEMU 7.2 has no ``file:`` migration URI and capsa's seccomp policy forbids ``exec:`` (it would fork a
shell), so the state file is opened here and handed to QEMU over QMP (``getfd`` + ``fd:`` URI). The
bandwidth cap is lifted first: 7.2 throttles migration to 32 MiB/s by default.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

from capsa.backend.qemu.monitor import Monitor
from capsa.errors import BackendError, SnapshotError

log = logging.getLogger(__name__)

POLL = 0.005
UNLIMITED_BANDWIDTH = 1 << 40


def open_for_write(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)


async def _wait_for_migration(monitor: Monitor, what: str, path: Path, timeout: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            info: dict[str, Any] = await monitor.execute("query-migrate")
        except BackendError as exc:  # QEMU quits when an incoming stream is bad
            raise SnapshotError(f"{what} failed: QEMU stopped ({exc.message})", path=path) from exc
        status = info.get("status")
        if status == "completed":
            return info
        if status in ("failed", "cancelled"):
            detail = info.get("error-desc", status)
            raise SnapshotError(f"{what} failed: {detail}", path=path)
        if loop.time() > deadline:
            raise SnapshotError(f"{what} did not finish within {timeout}s", path=path)
        await asyncio.sleep(POLL)


async def _ignore_shared(monitor: Monitor, on: bool) -> None:
    """``x-ignore-shared``: RAM in a shared file is left out of the stream (the file is the RAM)."""
    capability = {"capability": "x-ignore-shared", "state": on}
    await monitor.execute("migrate-set-capabilities", {"capabilities": [capability]})


async def save_state(
    monitor: Monitor, path: Path, timeout: float, *, ignore_shared: bool = False
) -> None:
    """Write the running VM's state to ``path``. The VM is paused while QEMU writes the final pass
    and left paused; the caller resumes it (``cont``)."""
    fd = open_for_write(path)
    try:
        await _ignore_shared(monitor, ignore_shared)
        await monitor.execute("migrate-set-parameters", {"max-bandwidth": UNLIMITED_BANDWIDTH})
        await monitor.send_fd(fd, "capsa-snapshot")
        await monitor.execute("migrate", {"uri": "fd:capsa-snapshot"})
    except BackendError as exc:
        raise SnapshotError(f"saving the VM state failed: {exc.message}", path=path) from exc
    finally:
        os.close(fd)  # QEMU holds its own copy now
    await _wait_for_migration(monitor, "saving the VM state", path, timeout)


async def fsync(path: Path) -> None:
    await asyncio.to_thread(_fsync, path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def load_state(
    monitor: Monitor, path: Path, timeout: float, *, ignore_shared: bool = False
) -> None:
    """Feed ``path`` to a QEMU started with ``-incoming defer``; returns once loaded (paused)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise SnapshotError(f"cannot read the snapshot state: {exc}", path=path) from exc
    try:
        await _ignore_shared(monitor, ignore_shared)
        await monitor.send_fd(fd, "capsa-restore")
        await monitor.execute("migrate-incoming", {"uri": "fd:capsa-restore"})
    except BackendError as exc:
        raise SnapshotError(f"restoring the VM state failed: {exc.message}", path=path) from exc
    finally:
        os.close(fd)
    await _wait_for_migration(monitor, "restoring the VM state", path, timeout)
