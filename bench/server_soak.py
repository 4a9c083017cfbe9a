"""Soak of ``capsa serve --state-dir``: concurrent clients create, exec, pause, resume, fork and
kill for a while; the server's open fds, threads and RSS and the state dir's size must stay flat
(bounded), not grow with the work done.

Each client loops: create, run a command, write a file, pause, resume (``connect``), read the file
back, fork one copy and kill it, kill the sandbox. A sampler records the server's figures every
``--every`` seconds; the start, middle and end rows are printed (the start row after the first
round of every client, once the server's caches are warm).

    .venv/bin/python -m bench.server_soak [--minutes 30] [--clients 4]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bench._report import figure, header
from bench.server import KEY, start_server

MEMORY = 256


@dataclass
class Row:
    at: float
    rounds: int
    fds: int
    threads: int
    rss_mib: float
    state_mib: float


def sample(pid: int, state: Path, started: float, rounds: int) -> Row:
    status = dict(
        line.split(":", 1)
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if ":" in line
    )
    size = sum(p.stat().st_blocks * 512 for p in state.rglob("*") if p.is_file())
    return Row(
        at=time.monotonic() - started,
        rounds=rounds,
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        threads=int(status["Threads"]),
        rss_mib=int(status["VmRSS"].split()[0]) / 1024,
        state_mib=size / (1 << 20),
    )


def client(stop: threading.Event, counts: list[int], errors: list[str], index: int) -> None:
    from e2b import Sandbox

    while not stop.is_set():
        sandbox = None
        try:
            sandbox = Sandbox.create(timeout=600)
            assert sandbox.commands.run("echo hi").stdout == "hi\n"
            sandbox.files.write("/home/user/f", f"round {counts[index]}")
            sandbox.pause()
            again = Sandbox.connect(sandbox.sandbox_id, timeout=600)
            assert again.files.read("/home/user/f") == f"round {counts[index]}"
            for fork in again.fork(count=1, timeout=60):
                fork.kill()
            counts[index] += 1
        except Exception as exc:
            errors.append(f"client {index}: {type(exc).__name__}: {str(exc)[:200]}")
        finally:
            if sandbox is not None:
                try:
                    Sandbox.kill(sandbox.sandbox_id)
                except Exception as exc:
                    errors.append(f"client {index} kill: {exc!r:.200}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--every", type=float, default=10.0, help="seconds between samples")
    args = parser.parse_args()
    header("server_soak")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    os.environ.update(E2B_API_URL=url, E2B_SANDBOX_URL=url, E2B_API_KEY=KEY)
    state = Path(tempfile.mkdtemp(prefix="capsa-bench-soak-"))
    log = state.parent / f"{state.name}.log"
    flags = (
        "--state-dir",
        str(state),
        "--max-sandboxes",
        str(2 * args.clients),
        "--metrics-interval",
        "5",
    )
    server = start_server(port, log, pools=(), memory=MEMORY, extra=flags)
    stop = threading.Event()
    counts = [0] * args.clients
    errors: list[str] = []
    threads = [
        threading.Thread(target=client, args=(stop, counts, errors, i), daemon=True)
        for i in range(args.clients)
    ]
    rows: list[Row] = []
    started = time.monotonic()
    try:
        for thread in threads:
            thread.start()
        while min(counts) < 1 and time.monotonic() - started < 600:
            time.sleep(0.5)
        warm = time.monotonic()
        while time.monotonic() - warm < args.minutes * 60:
            rows.append(sample(server.pid, state, started, sum(counts)))
            time.sleep(args.every)
        rows.append(sample(server.pid, state, started, sum(counts)))
    finally:
        stop.set()
        for thread in threads:
            thread.join(600)
        server.send_signal(signal.SIGTERM)
        server.wait(300)
        shutil.rmtree(state, ignore_errors=True)
    work = "create, exec, write, pause, resume, read, fork+kill, kill"
    print(f"{args.clients} clients for {args.minutes:g} min after warm-up; {sum(counts)} rounds "
          f"({work}), {len(errors)} errors")  # fmt: skip
    print(
        f"{'':8} {'t (s)':>7} {'rounds':>7} {'fds':>5} {'threads':>8} {'RSS MiB':>8} {'state MiB':>10}"
    )
    for label, row in (("start", rows[0]), ("middle", rows[len(rows) // 2]), ("end", rows[-1])):
        print(f"{label:8} {row.at:7.0f} {row.rounds:7d} {row.fds:5d} {row.threads:8d} "
              f"{row.rss_mib:8.1f} {row.state_mib:10.1f}")  # fmt: skip
    rss, size = max(r.rss_mib for r in rows), max(r.state_mib for r in rows)
    print(f"max over the run: fds {max(r.fds for r in rows)}, threads {max(r.threads for r in rows)}, "
          f"RSS {rss:.1f} MiB, state {size:.1f} MiB")  # fmt: skip
    for line in errors[:10]:
        print("error:", line)
    figure("server_soak_fds_growth", rows[-1].fds - rows[0].fds, "fds")
    figure("server_soak_rss_growth_mib", rows[-1].rss_mib - rows[0].rss_mib, "MiB")
    figure("server_soak_state_mib_end", rows[-1].state_mib, "MiB")
    figure("server_soak_errors", len(errors), "errors")


if __name__ == "__main__":
    main()
