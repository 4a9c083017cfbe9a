"""``capsa serve`` under abusive clients: the server's memory and event-loop lag, idle vs abused.

Starts ``capsa serve`` from the current ``PYTHONPATH`` and two sandboxes, measures an idle baseline,
then for the same time runs at once:

(a) a client that starts ``head -c 1000M /dev/zero`` through the Connect stream and stops reading
    after the first bytes (the server must hold the guest back, not buffer its output);
(b) a command in the other sandbox that trickles output a byte at a time without newlines
    (``printf x; sleep 0.001`` in a loop), read to the end by a client;
(c) 50 connections that trickle an unfinished request head a byte a second (slowloris).

Meanwhile a separate thread samples the server's RSS (``VmRSS``) and times ``GET /health`` (the
event-loop lag a normal client sees). Bounded to about a minute.

    PYTHONPATH=src .venv/bin/python -m bench.server_abuse [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import socket
import statistics
import struct
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench._report import figure, header
from bench.server import KEY, start_server, stop_server

STREAM = "application/connect+json"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Sampler(threading.Thread):
    """RSS every 0.25 s and a /health round trip every 20 ms, on its own connection and thread."""

    def __init__(self, port: int, pid: int) -> None:
        super().__init__(daemon=True)
        self.port, self.pid = port, pid
        self.rss: list[float] = []
        self.lag: list[float] = []
        self.failures = 0
        self.stop = threading.Event()

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        next_rss = 0.0
        while not self.stop.is_set():
            now = time.monotonic()
            if now >= next_rss:
                self.rss.append(rss_mib(self.pid))
                next_rss = now + 0.25
            started = time.monotonic()
            try:
                conn.request("GET", "/health")
                conn.getresponse().read()
                self.lag.append(time.monotonic() - started)
            except (OSError, http.client.HTTPException):
                self.failures += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            time.sleep(0.02)
        conn.close()


def envelope(message: dict[str, Any]) -> bytes:
    body = json.dumps(message).encode()
    return struct.pack(">BI", 0, len(body)) + body


def create(port: int) -> dict[str, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/sandboxes",
        data=b'{"timeout": 600}',
        headers={"X-API-KEY": KEY, "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as reply:
        info: dict[str, Any] = json.loads(reply.read())
        return info


async def start_stream(port: int, info: dict[str, Any], command: str) -> tuple[Any, Any]:
    """Open a Connect ``process.Process/Start`` stream by hand (so not reading it really stalls)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = envelope({"process": {"cmd": "/bin/bash", "args": ["-c", command]}})
    head = (
        f"POST /process.Process/Start HTTP/1.1\r\nHost: x\r\nE2b-Sandbox-Id: {info['sandboxID']}\r\n"
        f"X-Access-Token: {info['envdAccessToken']}\r\nContent-Type: {STREAM}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    writer.write(head + body)
    await writer.drain()
    await reader.readuntil(b"\r\n\r\n")
    return reader, writer


async def abuse(port: int, a: dict[str, Any], b: dict[str, Any], seconds: float) -> dict[str, float]:
    stalled = await start_stream(port, a, "head -c 1000M /dev/zero")
    await stalled[0].read(4096)  # the flood is flowing; from now on it is not read
    trickle_reader, trickle_writer = await start_stream(
        port, b, "while :; do printf x; sleep 0.001; done"
    )
    got = 0

    async def read_trickle() -> None:
        nonlocal got
        while chunk := await trickle_reader.read(65536):
            got += len(chunk)

    closed = 0

    async def slowloris() -> None:
        nonlocal closed
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /health HTTP/1.1\r\n")
        try:
            while True:
                writer.write(b"X")
                await writer.drain()
                with contextlib.suppress(TimeoutError):
                    if not await asyncio.wait_for(reader.read(4096), 1):
                        break
        except OSError:
            pass
        closed += 1  # by the server (a 408, then the end of the connection)
        writer.close()

    tasks = [asyncio.create_task(read_trickle()), *(asyncio.create_task(slowloris()) for _ in range(50))]
    await asyncio.sleep(seconds)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for _, writer in (stalled, (trickle_reader, trickle_writer)):
        writer.close()
    return {"trickled": got, "slowloris_closed": closed}


def quantile(samples: list[float], q: float) -> float:
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(port: int, pid: int, during: Any) -> tuple[Sampler, Any]:
    sampler = Sampler(port, pid)
    sampler.start()
    try:
        result = during()
    finally:
        sampler.stop.set()
        sampler.join(15)
    return sampler, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    header("server_abuse")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = Path(f"/tmp/capsa-bench-abuse-{port}.log")
    server = start_server(port, log, pools=("base=2",), memory=256)
    try:
        a, b = create(port), create(port)
        idle, _ = measure(port, server.pid, lambda: time.sleep(args.seconds / 2))
        busy, extra = measure(port, server.pid, lambda: asyncio.run(abuse(port, a, b, args.seconds)))
    finally:
        stop_server(server, 30)
    rows = [
        ("server RSS (max)", max(idle.rss), max(busy.rss), "MiB"),
        ("server RSS (end)", idle.rss[-1], busy.rss[-1], "MiB"),
        ("/health p50", statistics.median(idle.lag) * 1000, statistics.median(busy.lag) * 1000, "ms"),
        ("/health p99", quantile(idle.lag, 0.99) * 1000, quantile(busy.lag, 0.99) * 1000, "ms"),
    ]
    print(f"{'':20} {'idle':>10} {'abused':>10} {'ratio':>8}")
    for name, quiet, loud, unit in rows:
        print(f"{name:20} {quiet:8.1f}{unit:>2} {loud:8.1f}{unit:>2} {loud / quiet:7.2f}x")
    print(
        f"/health failures under abuse: {busy.failures}; trickled bytes read: {extra['trickled']}; "
        f"slowloris connections closed by the server: {extra['slowloris_closed']}/50"
    )
    figure("abuse_rss_max_mib", max(busy.rss), "MiB")
    figure("abuse_rss_growth_mib", max(busy.rss) - max(idle.rss), "MiB")
    figure("abuse_health_p99_ms", quantile(busy.lag, 0.99) * 1000, "ms")


if __name__ == "__main__":
    main()
