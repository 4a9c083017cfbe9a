"""Ingress (``get_host(port)`` through ``capsa serve`` and the guest agent) vs the alternatives, side
by side in one run, the same guest HTTP server (``python3 -m http.server``) on both sides:

- an HTTP GET round trip through ``get_host`` vs the same GET through a NAT port forward of a
  sandbox with a network (``Gateway.forward_tcp``) (goal: ratio <= 1.5x);
- a 64 MiB download through ``get_host`` vs ``agent.read_file`` of a file of the same size
  (goal: throughput ratio >= 0.5x).

    .venv/bin/python -m bench.ingress [--runs 30] [--mib 64]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import time
from pathlib import Path

import httpx

import capsa
from bench._report import figure, header
from bench.server import KEY, MEMORY, start_server
from capsa import Gateway, VirtualNetwork

SERVE = ["python3", "-m", "http.server", "8000", "--directory", "/tmp/www"]


async def _prepare(vm: capsa.Sandbox, mib: int) -> None:
    await vm.agent.mkdir("/tmp/www", parents=True)
    await vm.agent.write_file("/tmp/www/small.txt", "hello\n")
    make = f"head -c {mib << 20} /dev/urandom > /tmp/www/big.bin"
    assert (await vm.agent.exec("sh").args(["-c", make]).run()).exit_code == 0


async def _wait(client: httpx.AsyncClient, url: str, headers: dict[str, str]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if (await client.get(url, headers=headers)).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.2)
    raise RuntimeError(f"{url} did not answer")


async def _download(client: httpx.AsyncClient, url: str, headers: dict[str, str]) -> tuple[int, float]:
    started = time.perf_counter()
    size = 0
    async with client.stream("GET", url, headers=headers) as reply:
        async for chunk in reply.aiter_raw():
            size += len(chunk)
    return size, time.perf_counter() - started


async def figures(url: str, runs: int, mib: int) -> dict[str, float]:
    os.environ.update(E2B_API_URL=url, E2B_SANDBOX_URL=url, E2B_API_KEY=KEY)
    from e2b import AsyncSandbox

    remote = await AsyncSandbox.create(timeout=600)
    gateway = Gateway("10.0.2.0/24").forward_tcp(0, 8000)
    local = await capsa.sandbox().memory_mb(MEMORY).network(VirtualNetwork.with_gateway(gateway)).build()
    try:
        await remote.files.make_dir("/tmp/www")
        await remote.files.write("/tmp/www/small.txt", "hello\n")
        made = await remote.commands.run(f"head -c {mib << 20} /dev/urandom > /tmp/www/big.bin")
        assert made.exit_code == 0
        await remote.commands.run(" ".join(SERVE), background=True)
        await _prepare(local, mib)
        server = await local.agent.exec(SERVE[0]).args(SERVE[1:]).spawn()
        forward = local.network.forwards()[0]
        nat_url = f"http://127.0.0.1:{forward.host_port}"
        ingress = {"Host": remote.get_host(8000)}
        async with httpx.AsyncClient(timeout=300) as client:
            await _wait(client, f"{url}/small.txt", ingress)
            await _wait(client, f"{nat_url}/small.txt", {})
            via_host, via_nat = [], []
            for _ in range(runs):  # interleaved: the machine's load weighs on both alike
                start = time.perf_counter()
                assert (await client.get(f"{url}/small.txt", headers=ingress)).text == "hello\n"
                via_host.append(time.perf_counter() - start)
                start = time.perf_counter()
                assert (await client.get(f"{nat_url}/small.txt")).text == "hello\n"
                via_nat.append(time.perf_counter() - start)
            host_mibs, read_mibs = [], []
            for _ in range(3):
                size, seconds = await _download(client, f"{url}/big.bin", ingress)
                assert size == mib << 20
                host_mibs.append(mib / seconds)
                start = time.perf_counter()
                data = await local.agent.read_file("/tmp/www/big.bin")
                read_mibs.append(mib / (time.perf_counter() - start))
                assert len(data) == mib << 20
        await server.kill()
    finally:
        await remote.kill()
        await local.kill()
    return {
        "get_host_ms": statistics.median(via_host) * 1000,
        "nat_ms": statistics.median(via_nat) * 1000,
        "get_host_mibs": statistics.median(host_mibs),
        "read_file_mibs": statistics.median(read_mibs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--mib", type=int, default=64)
    args = parser.parse_args()
    header("ingress")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = Path(f"/tmp/capsa-bench-ingress-{port}.log")
    server = start_server(port, log, pools=("base=1",))
    try:
        time.sleep(3)  # the pool fills
        f = asyncio.run(figures(f"http://127.0.0.1:{port}", args.runs, args.mib))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
        log.unlink(missing_ok=True)
    rtt_ratio = f["get_host_ms"] / f["nat_ms"]
    speed_ratio = f["get_host_mibs"] / f["read_file_mibs"]
    print(f"{'':30} {'get_host':>10} {'other':>10} {'ratio':>7}  goal")
    print(f"{'GET round trip (vs NAT fwd)':30} {f['get_host_ms']:8.1f}ms {f['nat_ms']:8.1f}ms "
          f"{rtt_ratio:6.2f}x  <= 1.5x")  # fmt: skip
    print(f"{f'{args.mib} MiB download (vs read_file)':30} {f['get_host_mibs']:5.0f}MiB/s "
          f"{f['read_file_mibs']:5.0f}MiB/s {speed_ratio:6.2f}x  >= 0.5x")  # fmt: skip
    figure("ingress_get_ms", f["get_host_ms"], "ms")
    figure("ingress_get_ratio_vs_nat", rtt_ratio, "x", "<= 1.5")
    figure("ingress_download_mibs", f["get_host_mibs"], "MiB/s")
    figure("ingress_download_ratio_vs_read_file", speed_ratio, "x", ">= 0.5")


if __name__ == "__main__":
    main()
