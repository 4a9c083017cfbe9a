"""``capsa serve --state-dir`` across restarts: what a restart costs and what it does to the
sandboxes kept.

1. With N paused sandboxes: a resume without a restart (``Sandbox.connect`` + a command, the
   first call), for ``--samples`` of them, each paused again after.
2. SIGTERM → the server exits → start again → ``/health`` answers: the restart's time.
3. The first call to a paused sandbox after the restart (same measure as 1): the ratio to 1
   (goal <= 1.2x).
4. All N resumed (running), then SIGTERM: the time until the server has paused them all and
   exited, and the count found paused after the next start.

    .venv/bin/python -m bench.server_restart [--count 10] [--samples 3]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from bench._report import figure, header
from bench.server import KEY, start_server

GOAL = 1.2
MEMORY = 256


def first_call(sandbox_id: str) -> float:
    from e2b import Sandbox

    started = time.perf_counter()
    assert Sandbox.connect(sandbox_id, timeout=600).commands.run("true").exit_code == 0
    return time.perf_counter() - started


def stop(server: subprocess.Popen[bytes]) -> float:
    started = time.perf_counter()
    server.send_signal(signal.SIGTERM)
    server.wait(600)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=10, help="paused (then running) sandboxes")
    parser.add_argument("--samples", type=int, default=3, help="first calls measured each way")
    args = parser.parse_args()
    header("server_restart")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    os.environ.update(E2B_API_URL=url, E2B_SANDBOX_URL=url, E2B_API_KEY=KEY)
    from e2b import Sandbox

    state = Path(tempfile.mkdtemp(prefix="capsa-bench-restart-"))
    log = state.parent / f"{state.name}.log"
    flags = ("--state-dir", str(state), "--max-sandboxes", str(args.count + 1),
             "--shutdown-timeout", "600")  # fmt: skip

    def start() -> tuple[subprocess.Popen[bytes], float]:
        began = time.perf_counter()
        server = start_server(port, log, pools=(), memory=MEMORY, extra=flags)
        return server, time.perf_counter() - began

    server, _ = start()
    ids: list[str] = []
    try:
        for _ in range(args.count):
            sandbox = Sandbox.create(timeout=3600)
            sandbox.commands.run("echo kept > /home/user/kept")
            sandbox.pause()
            ids.append(sandbox.sandbox_id)
        before = []
        for sandbox_id in ids[: args.samples]:
            before.append(first_call(sandbox_id))
            Sandbox.connect(sandbox_id).pause()
        down = stop(server)
        server, up = start()
        after = [first_call(sandbox_id) for sandbox_id in ids[args.samples : 2 * args.samples]]
        for sandbox_id in ids:
            Sandbox.connect(sandbox_id, timeout=3600)  # all running
        pausing = stop(server)
        text = log.read_text()
        said = re.findall(r"shutdown: paused (\d+) of (\d+) running sandboxes in ([0-9.]+)s", text)
        server, _ = start()
        paused = sum(
            1 for s in Sandbox.list().next_items() if str(getattr(s.state, "value", s.state)) == "paused"
        )
    finally:
        for sandbox_id in ids:
            with contextlib.suppress(Exception):
                Sandbox.kill(sandbox_id)
        server.send_signal(signal.SIGTERM)
        server.wait(120)
        shutil.rmtree(state, ignore_errors=True)
    resume, again = statistics.median(before) * 1000, statistics.median(after) * 1000
    print(f"N = {args.count} sandboxes of {MEMORY} MiB; first call = Sandbox.connect + commands.run")
    print(f"restart with {args.count} paused: SIGTERM->exit {down:.2f}s, start->healthy {up:.2f}s, "
          f"total {down + up:.2f}s")  # fmt: skip
    print(f"first call of a paused sandbox: no restart {resume:.0f}ms, after the restart "
          f"{again:.0f}ms, ratio {again / resume:.2f}x (goal <= {GOAL}x)")  # fmt: skip
    print(f"SIGTERM with {args.count} running: all paused and exited in {pausing:.2f}s "
          f"(server's own count: {said[-1] if said else 'not logged'}); paused after the next "
          f"start: {paused} of {args.count}")  # fmt: skip
    print("samples (s) no restart: " + " ".join(f"{s:.2f}" for s in before))
    print("samples (s) after restart: " + " ".join(f"{s:.2f}" for s in after))
    figure("server_restart_seconds", down + up, "s")
    figure("server_restart_first_call_ratio", again / resume, "x", f"<= {GOAL}")
    figure("server_sigterm_pause_all_seconds", pausing, "s")


if __name__ == "__main__":
    main()
