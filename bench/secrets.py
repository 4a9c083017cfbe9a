"""Secrets (docs/secrets.md): what the swapping proxy costs a guest's HTTPS, side by side in one sandbox.
The same local HTTPS server (127.0.0.x:443, a test CA) is reached as a host bound to a secret (the
gateway terminates TLS, swaps the placeholder, verifies and re-encrypts upstream) and as a host with
no secret (plain NAT). Request latency (a new connection per request, and keep-alive) and a 64 MiB
download, each as a ratio of the two; and what arming the secrets (a new CA, installed in the guest)
adds to build() from a template (builds with and without secrets alternate). Goals: latency <= 1.5x,
download >= 0.7x, build <= 1.1x. Then one guest opens --connections HTTPS connections to the bound
host at once and holds them (all intercepted at the same time): its time, and the peak file
descriptors and memory this process gained meanwhile (the proxy, the NAT and the bench's own HTTPS
servers, which run in this process too).

    .venv/bin/python -m bench.secrets [--requests 30] [--runs 3] [--builds 7] [--connections 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import threading
import time
from dataclasses import replace

from tests.secret_servers import API, FREE, MANY_CLIENT, VALUE, Upstreams, upstreams

import capsa
from bench._report import figure, header
from capsa import VirtualNetwork

SCRIPT = r"""
import http.client, json, os, ssl, sys, time
host, ca, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
context = ssl.create_default_context(cafile=ca) if ca else ssl.create_default_context()
headers = {"Authorization": "Bearer " + os.environ["KEY"]}
def one(conn):
    conn.request("GET", "/v1", headers=headers)
    conn.getresponse().read()
fresh = []
for _ in range(count):
    started = time.monotonic()
    conn = http.client.HTTPSConnection(host, 443, context=context, timeout=60)
    one(conn)
    fresh.append(time.monotonic() - started)
    conn.close()
conn = http.client.HTTPSConnection(host, 443, context=context, timeout=60)
one(conn)
kept = []
for _ in range(count):
    started = time.monotonic()
    one(conn)
    kept.append(time.monotonic() - started)
started = time.monotonic()
conn.request("GET", "/big", headers=headers)
size = len(conn.getresponse().read())
elapsed = time.monotonic() - started
print(json.dumps({"fresh": sorted(fresh)[len(fresh) // 2], "kept": sorted(kept)[len(kept) // 2],
                  "mib_s": size / elapsed / (1 << 20)}))
"""


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--builds", type=int, default=7)
    parser.add_argument("--connections", type=int, default=1000)
    args = parser.parse_args()
    header("secrets")
    with upstreams() as servers:
        if args.builds:
            await _builds(servers, args.builds)
        if args.connections:
            await _many(servers, args.connections)
        network = VirtualNetwork.with_gateway(servers.gateway())
        async with capsa.sandbox().network(network) as vm:
            await vm.agent.write_file("/tmp/test-ca.pem", servers.ca_file.read_bytes())
            results: dict[str, list[dict[str, float]]] = {"proxy": [], "direct": []}
            for _ in range(args.runs):
                for label, host, ca in (("proxy", API, ""), ("direct", FREE, "/tmp/test-ca.pem")):
                    argv = ["-c", SCRIPT, host, ca, str(args.requests)]
                    done = await vm.agent.exec("python3").args(argv).timeout(600).run()
                    done.check()
                    results[label].append(json.loads(done.stdout))
    if not args.runs:
        return
    summary = {
        label: {key: statistics.median(r[key] for r in runs) for key in ("fresh", "kept", "mib_s")}
        for label, runs in results.items()
    }
    proxy, direct = summary["proxy"], summary["direct"]
    for what, key, goal in (("request, new connection", "fresh", "<= 1.5x"),
                            ("request, keep-alive", "kept", "<= 1.5x")):  # fmt: skip
        a, b = proxy[key] * 1000, direct[key] * 1000
        print(f"HTTPS {what}: proxy {a:.1f} ms, direct {b:.1f} ms: {a / b:.2f}x (goal {goal})")
    a, b = proxy["mib_s"], direct["mib_s"]
    print(
        f"64 MiB HTTPS download: proxy {a:.1f} MiB/s, direct {b:.1f} MiB/s: {a / b:.2f}x (goal >= 0.7x)"
    )
    figure("secrets_latency_new_connection_vs_direct", proxy["fresh"] / direct["fresh"], "x", "<= 1.5")
    figure("secrets_latency_keepalive_vs_direct", proxy["kept"] / direct["kept"], "x", "<= 1.5")
    figure("secrets_download_vs_direct", proxy["mib_s"] / direct["mib_s"], "x", ">= 0.7")


async def _builds(servers: Upstreams, count: int) -> None:
    """build() -> first exec from the template, with secrets and without (same policy and DNS),
    alternating, so both see the same load; medians."""
    with_secrets = VirtualNetwork.with_gateway(servers.gateway())
    without = VirtualNetwork.with_gateway(replace(servers.gateway(), secrets=()))
    await (await capsa.sandbox().network(without).build()).stop()  # the template exists
    times: dict[str, list[float]] = {"with": [], "without": []}
    for _ in range(count):
        for label, network in (("without", without), ("with", with_secrets)):
            started = time.monotonic()
            vm = await capsa.sandbox().network(network).build()
            await vm.agent.exec("true").run()
            times[label].append(time.monotonic() - started)
            await vm.stop()
    a, b = statistics.median(times["with"]), statistics.median(times["without"])
    pairs = statistics.median(w / o for w, o in zip(times["with"], times["without"], strict=True))
    print(f"build() from the template to a first exec ({count} each): with secrets {a * 1000:.0f} ms, "
          f"without {b * 1000:.0f} ms: {a / b:.2f}x (median of pairs {pairs:.2f}x) "
          "(goal <= 1.1x)")  # fmt: skip
    figure("secrets_build_vs_without", a / b, "x", "<= 1.1")


def _usage() -> tuple[int, int]:
    """This process's open file descriptors and resident memory (bytes)."""
    with open("/proc/self/statm") as statm:
        rss = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return len(os.listdir("/proc/self/fd")), rss


async def _many(servers: Upstreams, count: int) -> None:
    """One guest opens ``count`` HTTPS connections to the bound host at once, holding them all."""
    network = VirtualNetwork.with_gateway(servers.gateway())
    async with capsa.sandbox().network(network) as vm:
        base = _usage()
        peak = list(base)
        stop = threading.Event()

        def sample() -> None:  # a thread: the event loop is busy relaying
            while not stop.wait(0.05):
                fds, rss = _usage()
                peak[0], peak[1] = max(peak[0], fds), max(peak[1], rss)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        before = len(servers.seen)
        try:
            argv = ["-c", MANY_CLIENT, API, str(count)]
            done = await vm.agent.exec("python3").args(argv).timeout(600).run()
        finally:
            stop.set()
            sampler.join(5)
        done.check()
        out = json.loads(done.stdout)
        swapped = sum(s.headers.get("Authorization") == f"Bearer {VALUE}" for s in servers.seen[before:])
        refused = sum(e.rule.startswith("secrets proxy refused") for e in vm.network.log())
    fds, rss = peak[0] - base[0], (peak[1] - base[1]) / (1 << 20)
    print(f"{count} concurrent intercepted HTTPS connections from one guest: {out['ok']} ok, "
          f"{out['failed']} failed, {swapped} got the value, {refused} refused, "
          f"in {out['seconds']:.1f} s; "
          f"this process's peak: +{fds} fds, +{rss:.0f} MiB RSS ({rss * 1024 / count:.0f} KiB per "
          f"connection, the bench's HTTPS servers included)")  # fmt: skip
    figure("secrets_concurrent_connections_ok", out["ok"], "connections", f"== {count}")
    figure("secrets_concurrent_connections_seconds", out["seconds"], "s", "")
    figure("secrets_concurrent_peak_fds", fds, "fds", "")
    figure("secrets_concurrent_peak_rss", rss, "MiB", "")


if __name__ == "__main__":
    asyncio.run(main())
