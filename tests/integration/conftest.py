"""Every integration test must leave no QEMU process and no runtime directory behind."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from capsa import _guardian


def _leftovers(root: Path) -> tuple[list[str], list[int]]:
    entries = root.iterdir() if root.exists() else iter(())
    dirs = sorted(p.name for p in entries if p.name != _guardian.OWNER_FILE)
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            # QEMU and virtiofsd both name a path in the runtime root on their command line.
            ours = str(root).encode() in cmdline
            if not ours and b"virtiofsd" in cmdline:  # started with --fd: its socket is in environ
                try:
                    ours = str(root).encode() in (entry / "environ").read_bytes()
                except OSError:
                    continue
            if ours and (b"qemu-system" in cmdline or b"virtiofsd" in cmdline):
                pids.append(int(entry.name))
    return dirs, pids


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    root = _guardian.runtime_root()
    yield
    deadline = time.monotonic() + 5
    dirs, pids = _leftovers(root)
    while (dirs or pids) and time.monotonic() < deadline:
        time.sleep(0.1)
        dirs, pids = _leftovers(root)
    assert not dirs, f"runtime dirs left behind: {dirs}"
    assert not pids, f"QEMU/virtiofsd processes left behind: {pids}"
