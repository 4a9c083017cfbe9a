"""Keystroke echo latency of the dashboard's terminal (issue 29): one key typed into a login shell
until its echo comes back, through the dashboard's WebSocket (``/ui/api/sandboxes/{id}/terminal``)
vs a PTY driven by the E2B SDK directly (``sandbox.pty.create`` + ``send_stdin``), the same sandbox,
keystrokes interleaved so the machine's load weighs on both alike (goal: ratio <= 1.5x).

    .venv/bin/python -m bench.ui_terminal [--keys 200]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import websocket

from bench._report import figure, header
from bench.server import KEY, start_server

KEYS = b"abcdefghijklmnopqrstuvwxyz"
SETTLE = 2.0  # seconds for a fresh shell to print its prompt before timing starts


def _drain_ws(ws: websocket.WebSocket, seconds: float) -> None:
    ws.settimeout(seconds)
    try:
        while True:
            ws.recv_data()
    except websocket.WebSocketTimeoutException:
        pass
    ws.settimeout(30)


def _ws_key(ws: websocket.WebSocket) -> Callable[[bytes], float]:
    def type_key(key: bytes) -> float:
        start = time.perf_counter()
        ws.send_binary(key)
        seen = b""
        while key not in seen:
            seen += ws.recv_data()[1]
        return time.perf_counter() - start

    return type_key


def _sdk_key(
    send: Callable[[bytes], None], output: Iterator[tuple[object, object, object]]
) -> Callable[[bytes], float]:
    def type_key(key: bytes) -> float:
        start = time.perf_counter()
        send(key)
        seen = b""
        while key not in seen:
            _, _, chunk = next(output)
            if isinstance(chunk, bytes | bytearray):
                seen += chunk
        return time.perf_counter() - start

    return type_key


def figures(url: str, keys: int) -> tuple[float, float]:
    from e2b import Sandbox
    from e2b.sandbox.commands.command_handle import PtySize

    sbx = Sandbox.create(api_key=KEY, api_url=url, sandbox_url=url, timeout=600)
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            login = http.post("/ui/login", data={"api_key": KEY})
            cookie = login.cookies["capsa_ui"]
        host = url.removeprefix("http://")
        ws = websocket.create_connection(
            f"ws://{host}/ui/api/sandboxes/{sbx.sandbox_id}/terminal?rows=24&cols=500",
            cookie=f"capsa_ui={cookie}",
            header={"Origin": url},
            suppress_origin=True,
            timeout=30,
        )
        handle = sbx.pty.create(PtySize(rows=24, cols=500), timeout=0)
        output = iter(handle)

        def send(data: bytes) -> None:
            sbx.pty.send_stdin(handle.pid, data)

        try:
            _drain_ws(ws, SETTLE)
            via_ws, via_sdk = _ws_key(ws), _sdk_key(send, output)
            for warm in (via_ws, via_sdk):  # the first keys pay for connections and caches
                for key in KEYS[:5]:
                    warm(bytes([key]))
            ws_times, sdk_times = [], []
            for n in range(keys):
                key = bytes([KEYS[n % len(KEYS)]])
                ws_times.append(via_ws(key))
                sdk_times.append(via_sdk(key))
        finally:
            ws.close()
            handle.kill()
    finally:
        sbx.kill()
    return statistics.median(ws_times) * 1000, statistics.median(sdk_times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keys", type=int, default=100)
    args = parser.parse_args()
    header("ui_terminal")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = Path(f"/tmp/capsa-bench-ui-terminal-{port}.log")
    server = start_server(port, log, pools=("base=1",))
    os.environ.pop("E2B_API_KEY", None)
    try:
        ws_ms, sdk_ms = figures(f"http://127.0.0.1:{port}", args.keys)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
        log.unlink(missing_ok=True)
    ratio = ws_ms / sdk_ms
    print(f"{'keystroke echo (median of ' + str(args.keys) + ')':34} {'latency':>9}")
    print(f"{'dashboard terminal (WebSocket)':34} {ws_ms:7.2f}ms")
    print(f"{'E2B SDK PTY (send_stdin + stream)':34} {sdk_ms:7.2f}ms")
    print(f"{'ratio':34} {ratio:7.2f}x  goal <= 1.5x")
    figure("ui_terminal_echo_ms", ws_ms, "ms")
    figure("ui_terminal_sdk_pty_echo_ms", sdk_ms, "ms")
    figure("ui_terminal_echo_ratio_vs_sdk", ratio, "x", "<= 1.5")


if __name__ == "__main__":
    main()
