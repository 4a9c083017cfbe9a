"""``capsa serve`` through the real E2B SDK vs capsa in-process, side by side in one run.

- create -> first ``commands.run("true")`` through the SDK with a warm pool, vs
  ``capsa.sandbox()`` (template restore) -> first exec in-process (goal: ratio <= 1.5x);
- ``commands.run("true")`` round trip through the server vs the in-process agent (goal <= 2x). The
  SDK runs every command as ``/bin/bash -l -c CMD``; the in-process figure runs that same argv (and
  plain ``true`` is printed too, for scale);
- ``run_code("1+1")`` round trip once the interpreter is warm (goal <= 20 ms under TCG);
- ``run_command("true")`` round trip through ``capsa mcp`` (the MCP face), for comparison.

    .venv/bin/python -m bench.server [--runs 10]
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import os
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import TextIO

import capsa
from bench._report import figure, header

KEY = "bench-key"
MEMORY = 384
BASH_TRUE = ["/bin/bash", "-l", "-c", "true"]


def ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def start_server(
    port: int,
    log: Path,
    pools: tuple[str, ...] = ("base=2", "code-interpreter-v1=1"),
    memory: int = MEMORY,
    *,
    extra: tuple[str, ...] = (),
    ca: Path | None = None,
) -> subprocess.Popen[bytes]:
    """``capsa serve`` from the current ``PYTHONPATH`` (so a bench can run old code beside new),
    healthy, with ``pools`` warm: every server bench starts its server here. ``ca``: the server
    serves HTTPS (``extra`` has ``--tls auto``) with a certificate from this CA."""
    args = ["--port", str(port), "--memory", str(memory), *extra]
    for pool in pools:
        args += ["--pool", pool]
    if "--state-dir" not in args:  # a state dir of its own: the default one admits one server
        state = tempfile.mkdtemp(prefix="capsa-bench-state-")
        atexit.register(shutil.rmtree, state, True)
        args += ["--state-dir", state]
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "capsa.cli", "serve", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "CAPSA_API_KEY": KEY},
        )
    deadline = time.monotonic() + 60
    scheme = "http" if ca is None else "https"
    while time.monotonic() < deadline:
        try:
            context = None if ca is None else ssl.create_default_context(cafile=ca)
            url = f"{scheme}://127.0.0.1:{port}/health"
            with urllib.request.urlopen(url, timeout=2, context=context):
                return process
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError(log.read_text()[-2000:])


def stop_server(server: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """SIGTERM (it stops its sandboxes), then SIGKILL if it has not exited within ``timeout``."""
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait(10)


async def figures(url: str, runs: int) -> dict[str, float]:
    """Both sides interleaved in one loop (the SDK's async client, capsa in-process), so that the
    machine's load, shared with other work, weighs on both alike."""
    os.environ.update(E2B_API_URL=url, E2B_SANDBOX_URL=url, E2B_API_KEY=KEY)
    from e2b import AsyncSandbox
    from e2b_code_interpreter import AsyncSandbox as AsyncCodeSandbox

    builder = capsa.sandbox().memory_mb(MEMORY)
    await (await builder.build()).kill()  # the template exists (or is recorded): restores below
    sdk_create, local_create = [], []
    for _ in range(runs):
        await asyncio.sleep(1.5)  # let the pool refill: measure a warm take
        start = time.perf_counter()
        sandbox = await AsyncSandbox.create(timeout=120)
        await sandbox.commands.run("true")
        sdk_create.append(time.perf_counter() - start)
        await sandbox.kill()
        start = time.perf_counter()
        vm = await builder.build()
        await vm.agent.exec(BASH_TRUE[0]).args(BASH_TRUE[1:]).run()
        local_create.append(time.perf_counter() - start)
        await vm.kill()
    sandbox = await AsyncSandbox.create(timeout=300)
    sdk_run, local_run, plain = [], [], []
    async with await builder.build() as vm:
        for _ in range(runs):
            start = time.perf_counter()
            await sandbox.commands.run("true")
            sdk_run.append(time.perf_counter() - start)
            start = time.perf_counter()
            await vm.agent.exec(BASH_TRUE[0]).args(BASH_TRUE[1:]).run()
            local_run.append(time.perf_counter() - start)
            start = time.perf_counter()
            await vm.agent.exec("true").run()
            plain.append(time.perf_counter() - start)
    await sandbox.kill()
    code = await AsyncCodeSandbox.create(timeout=300)
    await code.run_code("1+1")
    run_code = []
    for _ in range(runs):
        start = time.perf_counter()
        await code.run_code("1+1")
        run_code.append(time.perf_counter() - start)
    await code.kill()
    return {
        "sdk_create": ms(sdk_create),
        "local_create": ms(local_create),
        "sdk_run": ms(sdk_run),
        "local_run": ms(local_run),
        "plain": ms(plain),
        "run_code": ms(run_code),
    }


async def mcp_figure(runs: int, errlog: TextIO) -> float:
    """``run_command("true")`` round trip through ``capsa mcp`` and the ``mcp`` SDK's stdio client."""
    from mcp import ClientSession, StdioServerParameters, stdio_client

    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "capsa.cli", "mcp", "--memory", str(MEMORY), "--pool", "base=1"],
        env=dict(os.environ),
    )
    async with (
        stdio_client(params, errlog=errlog) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        created = await session.call_tool("create_sandbox", {})
        sandbox_id = (created.structured_content or {})["sandbox_id"]
        arguments = {"sandbox_id": sandbox_id, "command": "true"}
        await session.call_tool("run_command", arguments)
        samples = []
        for _ in range(runs):
            start = time.perf_counter()
            await session.call_tool("run_command", arguments)
            samples.append(time.perf_counter() - start)
        await session.call_tool("kill_sandbox", {"sandbox_id": sandbox_id})
    return ms(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    header("server")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = Path(f"/tmp/capsa-bench-server-{port}.log")
    server = start_server(port, log)
    try:
        time.sleep(5)  # pools fill
        f = asyncio.run(figures(f"http://127.0.0.1:{port}", args.runs))
    finally:
        stop_server(server, 30)
    rows = [
        ("create -> first run(true)", f["sdk_create"], f["local_create"], 1.5),
        ("run(true) round trip", f["sdk_run"], f["local_run"], 2.0),
    ]
    print(f"{'':28} {'via SDK':>10} {'in-process':>11} {'ratio':>7}  goal")
    for name, remote, here, goal in rows:
        print(f"{name:28} {remote:8.1f}ms {here:9.1f}ms {remote / here:6.2f}x  <= {goal}x")
    print(f"{'in-process exec(true)':28} {'':>10} {f['plain']:9.1f}ms   (no bash, for scale)")
    print(f"{'run_code(1+1) round trip':28} {f['run_code']:8.1f}ms {'':>11} {'':>7}  <= 20ms")
    with open(os.devnull, "w") as devnull:  # capsa mcp's log
        mcp_run = asyncio.run(mcp_figure(args.runs, devnull))
    print(f"{'capsa mcp run_command(true)':28} {mcp_run:8.1f}ms {f['local_run']:9.1f}ms "
          f"{mcp_run / f['local_run']:6.2f}x")  # fmt: skip
    figure("mcp_run_true_ms", mcp_run, "ms")
    figure("server_create_first_ms", f["sdk_create"], "ms")
    figure("server_create_first_ratio", f["sdk_create"] / f["local_create"], "x", "<= 1.5")
    figure("server_run_true_ms", f["sdk_run"], "ms")
    figure("server_run_true_ratio", f["sdk_run"] / f["local_run"], "x", "<= 2")
    figure("server_run_code_ms", f["run_code"], "ms", "<= 20")


if __name__ == "__main__":
    main()
