"""The dashboard (``/ui``) in a real headless Chromium against a real ``capsa serve``:

- SDK create -> the row on the live list: from ``Sandbox.create`` returning to the page's first
  render of the row (the page's own timestamp, same clock), median and max of ``--runs``;
- terminal keystroke echo: a key typed into the page's xterm.js until its echo is drawn, vs the
  same key through a PTY the E2B SDK drives directly (goal: <= 1.5x);
- with ``--sandboxes`` N (default 100) listed, ``--running`` of them (default 10) running and the
  rest paused (filesystem-only): the server's CPU with no page open vs 5 list pages open (5 tabs),
  and each page's update cost (the render of one pushed list). Two cores cannot run 100 TCG
  guests at once (a try reached a load average of 50 and pool timeouts): the paused ones are
  listed like running ones, without a guest to sample.

    PYTHONPATH=src .venv/bin/python -m bench.ui [--runs 10] [--sandboxes 100] [--running 10]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import os
import signal
import socket
import statistics
import time
from pathlib import Path
from typing import Any

import httpx

from bench._report import figure, header
from bench.server import KEY, start_server
from bench.server_metrics_idle import _cpu_seconds

BROWSER_ARGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage")
PAGES = 5
WINDOW = 30.0  # seconds of CPU measured per case


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def browser() -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = os.environ.get("CAPSA_CHROMIUM", "/usr/bin/chromium")
    for argument in (*BROWSER_ARGS, "--window-size=1400,1000"):
        options.add_argument(argument)
    driver = Service(os.environ.get("CAPSA_CHROMEDRIVER", "/usr/bin/chromedriver"))
    return webdriver.Chrome(options=options, service=driver)


def login(driver: Any, url: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(url + "/ui/login")
    driver.find_element(By.ID, "api_key").send_keys(KEY)
    driver.find_element(By.ID, "login").click()
    wait(lambda: driver.find_elements(By.ID, "sandboxes"), 30)


def wait(condition: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.01)
    raise TimeoutError("bench wait timed out")


def sdk(url: str) -> dict[str, Any]:
    return {"api_key": KEY, "api_url": url, "sandbox_url": url}


def appear_figure(driver: Any, url: str, runs: int) -> list[float]:
    """Seconds from each SDK create's return to the page's first render of its row."""
    from e2b import Sandbox

    login(driver, url)
    samples = []
    for _ in range(runs):
        sandbox = Sandbox.create(timeout=120, **sdk(url))
        returned = time.time() * 1000
        try:
            seen = wait(
                lambda s=sandbox: driver.execute_script(
                    "return window.capsaListStats.firstSeen[arguments[0]]", s.sandbox_id
                ),
                30,
            )
            samples.append((seen - returned) / 1000)
        finally:
            sandbox.kill()
    return samples


def fill(url: str, count: int, running: int, into: list[Any]) -> None:
    """``count`` sandboxes into ``into``, all but ``running`` of them paused (their files only)."""
    from e2b import Sandbox

    with httpx.Client(base_url=url, headers={"X-API-KEY": KEY}, timeout=120) as api:
        for index in range(count):
            sandbox = Sandbox.create(timeout=3600, metadata={"n": str(index)}, **sdk(url))
            into.append(sandbox)
            if index >= running:
                reply = api.post(f"/sandboxes/{sandbox.sandbox_id}/pause", json={"memory": False})
                reply.raise_for_status()


def kill_all(sandboxes: list[Any]) -> None:
    def one(sandbox: Any) -> None:
        with contextlib.suppress(Exception):
            sandbox.kill()

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(one, sandboxes))


def cpu_percent(pid: int, seconds: float) -> float:
    before, started = _cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return 100 * (_cpu_seconds(pid) - before) / (time.monotonic() - started)


def pages_figure(driver: Any, url: str, pid: int, count: int) -> dict[str, float]:
    """The server's CPU with no page, then with PAGES list pages open; their update costs."""
    idle = cpu_percent(pid, WINDOW)
    login(driver, url)
    handles = [driver.current_window_handle]
    for _ in range(PAGES - 1):
        driver.switch_to.new_window("tab")
        driver.get(url + "/ui/")
        handles.append(driver.current_window_handle)
    for handle in handles:
        driver.switch_to.window(handle)
        wait(lambda: driver.execute_script("return window.capsaListStats.rows") >= count, 120)
        driver.execute_script("Object.assign(window.capsaListStats, {updates: 0, totalMs: 0, maxMs: 0})")
    busy = cpu_percent(pid, WINDOW)
    costs, maxima, updates = [], [], 0
    for handle in handles:
        driver.switch_to.window(handle)
        stats = driver.execute_script("return window.capsaListStats")
        updates += stats["updates"]
        if stats["updates"]:
            costs.append(stats["totalMs"] / stats["updates"])
            maxima.append(stats["maxMs"])
    return {
        "idle": idle,
        "busy": busy,
        "update_ms": statistics.mean(costs) if costs else 0.0,
        "update_max_ms": max(maxima) if maxima else 0.0,
        "updates_per_page_s": updates / PAGES / WINDOW,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--sandboxes", type=int, default=100)
    parser.add_argument("--running", type=int, default=10, help="of them running, the rest paused")
    parser.add_argument("--memory", type=int, default=256, help="MB per sandbox")
    args = parser.parse_args()
    header("ui")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = Path(f"/tmp/capsa-bench-ui-{port}.log")
    server = start_server(
        port, log, ("base=2",), args.memory, extra=("--max-sandboxes", str(args.sandboxes + 4))
    )
    driver = browser()
    sandboxes: list[Any] = []
    try:
        time.sleep(3)  # the pool fills
        appear = appear_figure(driver, url, args.runs)
        print(f"SDK create -> row on the page: median {statistics.median(appear) * 1000:.0f} ms, "
              f"max {max(appear) * 1000:.0f} ms ({len(appear)} runs)")  # fmt: skip
        figure("ui_create_to_row_ms", statistics.median(appear) * 1000, "ms", "<= 2000")
        started = time.monotonic()
        fill(url, args.sandboxes, args.running, sandboxes)
        print(f"{len(sandboxes)} sandboxes listed, {min(args.running, len(sandboxes))} running "
              f"({time.monotonic() - started:.0f}s to create)")  # fmt: skip
        f = pages_figure(driver, url, server.pid, len(sandboxes))
        print(f"server CPU, {len(sandboxes)} sandboxes: no page {f['idle']:.1f}%, "
              f"{PAGES} list pages open {f['busy']:.1f}% (+{f['busy'] - f['idle']:.1f}%)")  # fmt: skip
        print(f"list page update with {len(sandboxes)} rows: mean {f['update_ms']:.1f} ms, "
              f"max {f['update_max_ms']:.1f} ms, "
              f"{f['updates_per_page_s']:.2f} updates/s per page")  # fmt: skip
        figure("ui_server_cpu_5_pages_pct", f["busy"], "%")
        figure("ui_server_cpu_no_page_pct", f["idle"], "%")
        figure("ui_list_update_ms", f["update_ms"], "ms")
    finally:
        driver.quit()
        kill_all(sandboxes)  # else the shutdown would pause them all (the bench has a state dir)
        server.send_signal(signal.SIGTERM)
        server.wait(120)


if __name__ == "__main__":
    main()
