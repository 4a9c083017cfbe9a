"""Ingress over HTTPS vs plain HTTP, side by side in one run: two ``capsa serve`` (one with
``--tls auto``), a sandbox on each serving the same file with ``python3 -m http.server``, and GETs
through ``get_host`` interleaved on both:

- keep-alive: one client connection reused (the TLS handshake paid once), the usual case for an
  SDK or a browser;
- a new connection per GET (a TCP connect and a full TLS handshake each time on the HTTPS side).

    .venv/bin/python -m bench.ingress_tls [--runs 60]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import ssl
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench._report import figure, header
from bench.server import KEY, start_server

SERVE = "python3 -m http.server 8000 --directory /tmp/www"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _sandbox(url: str) -> Any:
    from e2b import AsyncSandbox

    sandbox = await AsyncSandbox.create(timeout=600, api_url=url, sandbox_url=url, api_key=KEY)
    await sandbox.files.write("/tmp/www/small.txt", "hello\n")
    await sandbox.commands.run(SERVE, background=True)
    return sandbox


async def _get(client: httpx.AsyncClient, url: str, host: str) -> float:
    started = time.perf_counter()
    reply = await client.get(
        f"{url}/small.txt", headers={"Host": host}, extensions={"sni_hostname": host.rsplit(":", 1)[0]}
    )
    elapsed = time.perf_counter() - started
    if reply.status_code != 200 or reply.text != "hello\n":
        raise RuntimeError(f"{url} {host}: {reply.status_code} {reply.text[:200]}")
    return elapsed


async def _ready(client: httpx.AsyncClient, url: str, host: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            await _get(client, url, host)
            return
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def figures(http_url: str, https_url: str, ca: Path, runs: int) -> dict[str, float]:
    context = ssl.create_default_context(cafile=ca)
    plain_box, tls_box = await asyncio.gather(_sandbox(http_url), _sandbox(https_url))
    try:
        plain_host, tls_host = plain_box.get_host(8000), tls_box.get_host(8000)
        times: dict[str, list[float]] = {"http": [], "https": [], "http_new": [], "https_new": []}
        async with (
            httpx.AsyncClient(timeout=60) as plain,
            httpx.AsyncClient(timeout=60, verify=context) as secure,
        ):
            await _ready(plain, http_url, plain_host)
            await _ready(secure, https_url, tls_host)
            for _ in range(runs):  # interleaved: the machine's load weighs on both alike
                times["http"].append(await _get(plain, http_url, plain_host))
                times["https"].append(await _get(secure, https_url, tls_host))
                async with httpx.AsyncClient(timeout=60) as once:
                    times["http_new"].append(await _get(once, http_url, plain_host))
                async with httpx.AsyncClient(timeout=60, verify=context) as once:
                    times["https_new"].append(await _get(once, https_url, tls_host))
    finally:
        await asyncio.gather(plain_box.kill(), tls_box.kill())
    return {name: statistics.median(values) * 1000 for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=60)
    args = parser.parse_args()
    header("ingress_tls")
    tls_dir = Path(tempfile.mkdtemp(prefix="capsa-bench-tls-"))
    http_port, https_port = _free_port(), _free_port()
    logs = [Path(f"/tmp/capsa-bench-ingress-tls-{p}.log") for p in (http_port, https_port)]
    ca = tls_dir / "ca.pem"
    servers = []
    try:
        servers.append(start_server(http_port, logs[0], pools=("base=1",)))
        extra = ("--tls", "auto", "--tls-dir", str(tls_dir))
        servers.append(start_server(https_port, logs[1], pools=("base=1",), extra=extra, ca=ca))
        # the SDK's transport reads its trusted CAs once, when it is first used: before that
        os.environ["SSL_CERT_FILE"] = str(tls_dir / "bundle.pem")
        time.sleep(3)  # the pools fill
        f = asyncio.run(
            figures(f"http://127.0.0.1:{http_port}", f"https://127.0.0.1:{https_port}", ca, args.runs)
        )
    finally:
        for server in servers:
            server.send_signal(signal.SIGTERM)
            server.wait(30)
        for log in logs:
            log.unlink(missing_ok=True)
        shutil.rmtree(tls_dir, ignore_errors=True)
    kept, fresh = f["https"] / f["http"], f["https_new"] / f["http_new"]
    print(f"{'get_host GET':30} {'HTTP':>9} {'HTTPS':>9} {'ratio':>7}")
    print(f"{'keep-alive connection':30} {f['http']:7.1f}ms {f['https']:7.1f}ms {kept:6.2f}x")
    print(f"{'new connection each':30} {f['http_new']:7.1f}ms {f['https_new']:7.1f}ms {fresh:6.2f}x")
    figure("ingress_https_get_ms", f["https"], "ms")
    figure("ingress_https_vs_http_ratio", kept, "x")
    figure("ingress_https_new_connection_ms", f["https_new"], "ms")
    figure("ingress_https_vs_http_new_connection_ratio", fresh, "x")


if __name__ == "__main__":
    main()
