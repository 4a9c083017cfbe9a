"""What every bench prints first (machine, load, commit) and the figures ``bench.run_all`` collects.

A bench calls :func:`header` once at start and :func:`figure` for each number worth comparing across
runs. With ``CAPSA_BENCH_JSON`` set (``bench.run_all`` sets it), the figures are written there as
JSON when the bench exits, with the machine description.
"""

from __future__ import annotations

import atexit
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
_FIGURES: dict[str, dict[str, Any]] = {}


def commit() -> str:
    """The commit the bench ran on, ``+dirty`` when the work tree has changes."""
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def machine() -> dict[str, Any]:
    load = os.getloadavg()
    return {
        "cores": os.cpu_count(),
        "load_average": [round(x, 2) for x in load],
        "commit": commit(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def header(name: str) -> dict[str, Any]:
    """Print the machine line (cores, load average at start, commit) and remember it."""
    info = machine()
    load = " ".join(f"{x:.2f}" for x in info["load_average"])
    print(
        f"# {name}: {info['cores']} cores, load average {load}, commit {info['commit']}, {info['time']}",
        flush=True,
    )
    _MACHINE.update(info)
    return info


_MACHINE: dict[str, Any] = {}


def figure(name: str, value: float, unit: str, goal: str = "") -> None:
    """Record one figure (printed by the bench itself; collected for ``bench.run_all``)."""
    _FIGURES[name] = {"value": round(value, 4), "unit": unit, **({"goal": goal} if goal else {})}


def _dump() -> None:
    target = os.environ.get("CAPSA_BENCH_JSON")
    if not target or not _FIGURES:
        return
    data = {"bench": Path(sys.argv[0]).stem, "machine": _MACHINE, "figures": _FIGURES}
    Path(target).write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


atexit.register(_dump)
