"""Pause and resume through ``capsa serve`` and the real E2B SDK vs capsa's own snapshot and
restore, side by side in one run (goal: ratio <= 1.2x).

Each round pauses one sandbox through the SDK (``pause()``) and resumes it (``Sandbox.connect``),
then does the same to an in-process sandbox with the library (``snapshot(path)``, ``kill()``,
``capsa.sandbox().from_snapshot(path).build()``: what the server does for a pause and a resume).
The two sides alternate (each goes first every other round), so that the machine's load, shared
with other work, weighs on both alike; each side keeps going with the sandbox it restored.

A third side pauses another sandbox filesystem-only (``pause(mode="filesystem")``: its files are
packed, and the resume boots a new guest and writes them back) and is compared with the full
pause + resume through the SDK.

    .venv/bin/python -m bench.server_pause [--runs 8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import statistics
import tempfile
import time
from pathlib import Path

import capsa
from bench._report import figure, header
from bench.server import KEY, MEMORY, start_server

GOAL = 1.2
SETTLE = 0.5  # seconds between measurements: the previous one's snapshot files are freed meanwhile


Samples = dict[str, list[float]]


async def rounds(url: str, runs: int, scratch: Path) -> tuple[Samples, Samples, Samples]:
    os.environ.update(E2B_API_URL=url, E2B_SANDBOX_URL=url, E2B_API_KEY=KEY)
    from e2b import AsyncSandbox

    sandbox = await AsyncSandbox.create(timeout=600)
    await sandbox.files.write("/root/state.txt", "kept")
    files_only = await AsyncSandbox.create(timeout=600)
    await files_only.files.write("/root/state.txt", "kept")
    vm = await capsa.sandbox().memory_mb(MEMORY).build()
    await vm.agent.write_file("/root/state.txt", b"kept")
    sdk: Samples = {"pause": [], "resume": []}
    local: Samples = {"pause": [], "resume": []}
    fs: Samples = {"pause": [], "resume": []}

    async def via_sdk(index: int) -> None:
        nonlocal sandbox
        start = time.perf_counter()
        await sandbox.pause()
        paused = time.perf_counter()
        sandbox = await AsyncSandbox.connect(sandbox.sandbox_id, timeout=600)
        sdk["pause"].append(paused - start)
        sdk["resume"].append(time.perf_counter() - paused)
        assert await sandbox.files.read("/root/state.txt") == "kept"

    async def via_sdk_files(index: int) -> None:
        nonlocal files_only
        start = time.perf_counter()
        await files_only.pause(mode="filesystem")
        paused = time.perf_counter()
        files_only = await AsyncSandbox.connect(files_only.sandbox_id, timeout=600)
        fs["pause"].append(paused - start)
        fs["resume"].append(time.perf_counter() - paused)
        assert await files_only.files.read("/root/state.txt") == "kept"

    async def in_library(index: int) -> None:
        nonlocal vm
        target = scratch / f"snapshot-{index}"
        start = time.perf_counter()
        await vm.snapshot(target)
        await vm.kill()
        paused = time.perf_counter()
        vm = await capsa.sandbox().memory_mb(MEMORY).from_snapshot(target).build()
        local["pause"].append(paused - start)
        local["resume"].append(time.perf_counter() - paused)
        assert await vm.agent.read_file("/root/state.txt") == b"kept"
        shutil.rmtree(target, ignore_errors=True)

    try:
        for index in range(runs):  # each side goes first every other round
            for side in (via_sdk, in_library) if index % 2 == 0 else (in_library, via_sdk):
                await asyncio.sleep(SETTLE)
                await side(index)
            await asyncio.sleep(SETTLE)
            await via_sdk_files(index)
    finally:
        await sandbox.kill()
        await files_only.kill()
        await vm.kill()
    return sdk, local, fs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=8)
    args = parser.parse_args()
    header("server_pause")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = Path(f"/tmp/capsa-bench-server-pause-{port}.log")
    server = start_server(port, log, pools=())
    scratch = Path(tempfile.mkdtemp(prefix="capsa-bench-pause-"))
    try:
        sdk, local, fs = asyncio.run(rounds(f"http://127.0.0.1:{port}", args.runs, scratch))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
        shutil.rmtree(scratch, ignore_errors=True)
    totals = {side: [p + r for p, r in zip(s["pause"], s["resume"], strict=True)]
              for side, s in (("sdk", sdk), ("lib", local))}  # fmt: skip
    remote, here = statistics.median(totals["sdk"]) * 1000, statistics.median(totals["lib"]) * 1000
    ratio = remote / here
    print(
        f"{'(medians of ' + str(args.runs) + ')':34} {'via SDK':>10} {'library':>10} {'ratio':>7}  goal"
    )
    for part in ("pause", "resume"):
        a, b = statistics.median(sdk[part]) * 1000, statistics.median(local[part]) * 1000
        print(f"{part:34} {a:8.0f}ms {b:8.0f}ms {a / b:6.2f}x")
    print(f"{'pause + resume':34} {remote:8.0f}ms {here:8.0f}ms {ratio:6.2f}x  <= {GOAL}x")
    files = statistics.median([p + r for p, r in zip(fs["pause"], fs["resume"], strict=True)]) * 1000
    for part in ("pause", "resume"):
        a, b = statistics.median(fs[part]) * 1000, statistics.median(sdk[part]) * 1000
        print(f"{'filesystem-only ' + part:34} {a:8.0f}ms {b:8.0f}ms {a / b:6.2f}x  (vs full, SDK)")
    print(f"{'filesystem-only pause + resume':34} {files:8.0f}ms {remote:8.0f}ms "
          f"{files / remote:6.2f}x  (vs full, SDK)")  # fmt: skip
    for side, samples in totals.items():
        print(f"samples (s) {side}: " + " ".join(f"{s:.2f}" for s in samples))
    figure("server_pause_resume_ms", remote, "ms")
    figure("library_snapshot_restore_ms", here, "ms")
    figure("server_pause_resume_ratio", ratio, "x", f"<= {GOAL}")
    figure("server_files_pause_resume_ms", files, "ms")
    figure("server_files_vs_full_pause_ratio", files / remote, "x")


if __name__ == "__main__":
    main()
