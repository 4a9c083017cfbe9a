"""The idle cost of ``capsa serve``'s guest sampling (``get_metrics``): CPU seconds per second of
the server process, and of its guests' QEMU processes, with 4 idle sandboxes, sampling off
(``--metrics-interval 0``) vs on (the default 5 s), side by side in one run.

    .venv/bin/python -m bench.server_metrics_idle [--window 60] [--interval 5]
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench._report import figure, header

KEY = "bench-key"
SANDBOXES = 4
MEMORY = 256
_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def _children(pid: int) -> list[int]:
    found: list[int] = []
    tasks = Path(f"/proc/{pid}/task")
    if not tasks.is_dir():
        return found
    for task in tasks.iterdir():
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def _descendants(pid: int) -> list[int]:
    found, pending = [], _children(pid)
    while pending:
        child = pending.pop()
        found.append(child)
        pending += _children(child)
    return found


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def measure(interval: float, window: float) -> tuple[float, float]:
    """(server, guests) CPU seconds per second over ``window`` with 4 idle sandboxes."""
    port = _port()
    log = Path(tempfile.mkstemp(prefix="capsa-bench-metrics-", suffix=".log")[1])
    args = ["--port", str(port), "--memory", str(MEMORY), "--max-sandboxes", str(SANDBOXES)]
    args += ["--metrics-interval", str(interval)]
    state = tempfile.mkdtemp(prefix="capsa-bench-state-")  # its own: the default admits one server
    atexit.register(shutil.rmtree, state, True)
    args += ["--state-dir", state]
    with log.open("wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "capsa.cli", "serve", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "CAPSA_API_KEY": KEY},
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(log.read_text()[-2000:]) from None
                time.sleep(0.2)
        from e2b import Sandbox

        os.environ.update({"E2B_API_URL": url, "E2B_SANDBOX_URL": url, "E2B_API_KEY": KEY})
        sandboxes = [Sandbox.create(timeout=600) for _ in range(SANDBOXES)]
        time.sleep(5)  # boot settles
        guests = _descendants(server.pid)
        before = _cpu_seconds(server.pid), sum(_cpu_seconds(g) for g in guests)
        time.sleep(window)
        after = _cpu_seconds(server.pid), sum(_cpu_seconds(g) for g in guests)
        if interval:
            assert sandboxes[0].get_metrics(), "no samples"
        for sandbox in sandboxes:
            sandbox.kill()
        return (after[0] - before[0]) / window, (after[1] - before[1]) / window
    finally:
        server.terminate()
        server.wait(30)
        log.unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--window", type=float, default=60.0)
    parser.add_argument("--interval", type=float, default=5.0)
    args = parser.parse_args()
    header("server_metrics_idle")
    off = measure(0, args.window)
    on = measure(args.interval, args.window)
    print(
        f"server CPU, {SANDBOXES} idle sandboxes: sampling off {off[0] * 100:.2f}%, "
        f"every {args.interval:g}s {on[0] * 100:.2f}% (+{(on[0] - off[0]) * 100:.2f}% of a core)"
    )
    print(
        f"guests' QEMU CPU: sampling off {off[1] * 100:.2f}%, every {args.interval:g}s "
        f"{on[1] * 100:.2f}% (+{(on[1] - off[1]) * 100:.2f}% of a core)"
    )
    figure("metrics_sampling_server_cpu_pct", (on[0] - off[0]) * 100, "%")
    figure("metrics_sampling_guests_cpu_pct", (on[1] - off[1]) * 100, "%")


if __name__ == "__main__":
    main()
