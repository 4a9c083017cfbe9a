"""What N sandboxes need from the host's limits, against what the host allows.

Why here: ``capsa doctor --max-sandboxes N`` reports it, docs/performance.md §Density gives the same
per-sandbox figures, and admission control (:mod:`capsa.vm.admission`) refuses the one VM too many.
The figures are per *idle sandbox from the default template*, measured (bench/density.py) and
bounded by tests/integration/test_density.py:

- host process (the Python that owns the sandboxes): <= 8 fds (console, QMP and agent sockets,
  pipes), 1 thread on Python 3.11 (asyncio's child watcher waits in a thread per child; 0 on 3.12+),
  7 asyncio tasks;
- QEMU: 1 process with 4-5 threads and ~14 fds (a virtiofsd per virtio-fs share adds 1 process and
  a few threads); every thread counts against ``kernel.pid_max``, ``kernel.threads-max`` and the
  user's ``ulimit -u``.

``vm.max_map_count`` limits mappings per *process*: the host process maps 2 areas per thread
(stack and guard page), so it matters only past tens of thousands of sandboxes; QEMU's own ~150
mappings are far from it. It is reported for completeness.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from pathlib import Path

from capsa.vm.admission import FDS_PER_VM, VM_HOST_MB, mem_available_mb, min_free_mb, open_fds

__all__ = ["THREADS_PER_SANDBOX", "Limit", "limits_for"]

THREADS_PER_SANDBOX = 7  # QEMU's 4-5 threads, 1 in the host process, 1 spare (a virtiofsd has more)
MAPS_PER_SANDBOX = 4  # in the host process: a thread's stack and guard, sockets' none; 2 spare
IDLE_SANDBOX_MB = 32  # host memory per idle sandbox: 24-29 MiB measured (PSS), rounded up
_BASE_FDS = 64
_BASE_MAPS = 2000  # the host Python's own mappings (interpreter, libraries, arenas)


@dataclass(frozen=True)
class Limit:
    """One host limit: ``needed`` for N sandboxes vs ``allowed``, and how to raise it."""

    name: str
    needed: int
    allowed: int | None  # None: unlimited or unknown
    fix: str

    @property
    def ok(self) -> bool:
        return self.allowed is None or self.needed <= self.allowed


def _sysctl(name: str) -> int | None:
    try:
        return int(Path("/proc/sys", *name.split(".")).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _threads_now() -> int:
    """Threads on the whole host now (each is a pid): what new sandboxes add to."""
    try:
        return int(Path("/proc/loadavg").read_text().split()[3].split("/")[1])
    except (OSError, ValueError, IndexError):
        return 0


def _rlimit(which: int) -> int | None:
    soft, _hard = resource.getrlimit(which)
    return None if soft == resource.RLIM_INFINITY else soft


def limits_for(n: int) -> list[Limit]:
    """Every limit that N more sandboxes in this process would run into, as this host sets it."""
    fds = open_fds() + _BASE_FDS + FDS_PER_VM * n
    threads = _threads_now() + THREADS_PER_SANDBOX * n
    mem = min_free_mb() + IDLE_SANDBOX_MB * n
    return [
        Limit("open files (ulimit -n)", fds, _rlimit(resource.RLIMIT_NOFILE),
              f"ulimit -n {max(fds, 4096)} (or LimitNOFILE= in a systemd unit)"),
        Limit("processes+threads of this user (ulimit -u)", threads, _rlimit(resource.RLIMIT_NPROC),
              f"ulimit -u {threads} (or LimitNPROC=)"),
        Limit("kernel.pid_max", threads, _sysctl("kernel.pid_max"),
              f"sysctl -w kernel.pid_max={max(threads * 2, 4194304)}"),
        Limit("kernel.threads-max", threads, _sysctl("kernel.threads-max"),
              f"sysctl -w kernel.threads-max={threads * 2}"),
        Limit("vm.max_map_count (per process)", _BASE_MAPS + MAPS_PER_SANDBOX * n,
              _sysctl("vm.max_map_count"),
              f"sysctl -w vm.max_map_count={2 * (_BASE_MAPS + MAPS_PER_SANDBOX * n)}"),
        Limit("available memory (MiB)", mem, mem_available_mb(),
              f"fewer sandboxes or more RAM: {IDLE_SANDBOX_MB} MiB per idle sandbox assumed (busy ones "
              f"take more; bench/density.py measures it); each start is admitted while "
              f"{VM_HOST_MB} MiB plus CAPSA_MIN_FREE_MB remain"),
    ]  # fmt: skip
