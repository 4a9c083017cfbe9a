"""Admission control: refuse a new VM *before* QEMU starts when the host cannot hold it.

Why: past what memory allows, the next QEMU does not fail cleanly, the machine swaps or the OOM
killer picks a process (possibly the host's own); past ``ulimit -n``, a socketpair or an open in the
middle of a start fails with EMFILE and a half-built VM. Both are checked against the figures
measured per idle sandbox (docs/performance.md §Density), counting the VMs this process is starting
at the same moment (four concurrent builds all read the same ``MemAvailable``).

Configurable through the environment (read at every check, so a test or a server can change it):

- ``CAPSA_MIN_FREE_MB``: memory left to the host after the new VM's share (default: 5% of RAM,
  at least 512 MiB, at most 4 GiB); ``0`` turns the memory check off.
- ``CAPSA_VM_HOST_MB``: host memory one new VM is expected to take (default 48 MiB: an idle
  sandbox measured 30-45 MiB of PSS; a busy one grows with what its guest touches).
"""

from __future__ import annotations

import contextlib
import functools
import os
import resource
from collections.abc import Iterator
from pathlib import Path

from capsa.errors import CapacityError, ConfigError

__all__ = [
    "FDS_PER_VM",
    "VM_HOST_MB",
    "admit",
    "check_fds",
    "check_memory",
    "mem_available_mb",
    "min_free_mb",
]

VM_HOST_MB = 48
# Host Python fds per sandbox: console, QMP and agent sockets, the pidfd/child pipes asyncio keeps,
# log files; measured 4-5 (tests/integration/test_density.py bounds it). 8 leaves room for a share's
# virtiofsd or a network stack's listening socket.
FDS_PER_VM = 8
_FDS_SPARE = 64  # the host process's own files (imports, logs, an HTTP server's listeners)

_starting = 0  # VMs of this process between admission and their QEMU running


def _meminfo() -> dict[str, int]:
    values: dict[str, int] = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, _, rest = line.partition(":")
        fields = rest.split()
        if fields:
            values[name] = int(fields[0])  # KiB
    return values


def mem_available_mb() -> int:
    return _meminfo().get("MemAvailable", 0) // 1024


def _env_mb(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number of MiB, got {raw!r}") from None
    if value < 0:
        raise ConfigError(f"{name} must be >= 0, got {value}")
    return value


@functools.cache
def _total_mb() -> int:
    """The host's RAM: read once, not at every VM start."""
    return _meminfo().get("MemTotal", 0) // 1024


def min_free_mb() -> int:
    total = _total_mb()
    return _env_mb("CAPSA_MIN_FREE_MB", min(4096, max(512, total // 20)))


def check_memory(starting: int = 0) -> None:
    """Raise :class:`CapacityError` if one more VM (plus ``starting`` ones already admitted) would
    leave less than the reserve of memory available."""
    reserve = min_free_mb()
    if reserve == 0:
        return
    per_vm = _env_mb("CAPSA_VM_HOST_MB", VM_HOST_MB)
    available = mem_available_mb()
    needed = reserve + per_vm * (1 + starting)
    if available < needed:
        raise CapacityError(
            f"not enough memory for another VM: {available} MiB available, {needed} MiB needed "
            f"({per_vm} MiB for it, {per_vm * starting} for the {starting} starting, and "
            f"{reserve} MiB kept free for the host)",
            resource="memory",
            needed=needed,
            available=available,
            unit="MiB",
            hint="stop idle sandboxes, or lower CAPSA_MIN_FREE_MB / CAPSA_VM_HOST_MB "
            "if the host can take it (0 turns the check off)",
        )


def open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # no procfs: the check cannot count, so it does not refuse
        return 0


def check_fds(starting: int = 0) -> None:
    """Raise :class:`CapacityError` naming ``ulimit -n`` if this process cannot open one more VM's
    files (plus those of ``starting`` VMs already admitted)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return
    used = open_fds()
    needed = used + FDS_PER_VM * (1 + starting) + _FDS_SPARE
    if needed > soft:
        raise CapacityError(
            f"the open-file limit (ulimit -n, RLIMIT_NOFILE) is {soft}: {used} files are open and "
            f"another VM needs {FDS_PER_VM} more (plus {_FDS_SPARE} spare)",
            resource="open files",
            needed=needed,
            available=soft,
            unit="fds",
            hint=f"raise it (ulimit -n {max(4096, 2 * needed)}, or LimitNOFILE= in a systemd unit); "
            "`capsa doctor --max-sandboxes N` prints what N sandboxes need",
        )


@contextlib.contextmanager
def admit() -> Iterator[None]:
    """Check memory and fds for one more VM and count it as starting until the block exits."""
    global _starting  # one counter per process, by design
    check_fds(_starting)
    check_memory(_starting)
    _starting += 1
    try:
        yield
    finally:
        _starting -= 1
