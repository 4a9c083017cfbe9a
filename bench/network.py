"""The virtual network: a guest downloading from a host HTTP server, and TCP connect latency, through
capsa's userspace NAT vs QEMU's built-in slirp (``-netdev user``), same sandbox image, one run. Then
what a network adds to getting a sandbox: build() -> first exec with and without one, cold (the
address comes from ``capsa.ip=`` at boot, no DHCP) and from the template (the restored guest takes
a new MAC and address through iproute2).

    .venv/bin/python -m bench.network [--mib 64] [--connects 50] [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socketserver
import statistics
import threading
import time
from dataclasses import replace

from dnslib import QTYPE, RR, A
from dnslib.server import BaseResolver, DNSServer

import capsa
from bench._report import figure, header
from capsa import Gateway, NetworkPolicy, VirtualNetwork
from capsa.sandbox.builder import boot_sandbox
from capsa.sandbox.handle import Sandbox

PAYLOAD = b""


class _Http(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        line = self.rfile.readline()
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass
        body = PAYLOAD if b"/big" in line else b"ok"
        self.wfile.write(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)


class LoopbackResolver(BaseResolver):
    """Answers every A question with 127.0.0.1 (the benches' servers listen there)."""

    def resolve(self, request, handler):  # type: ignore[no-untyped-def]
        reply = request.reply()
        if request.q.qtype == QTYPE.A:
            reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A("127.0.0.1"), ttl=60))
        return reply


SCRIPT = """
import socket, sys, time, urllib.request
host, port, connects = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
urllib.request.urlopen(f"http://{host}:{port}/", timeout=30).read()
started = time.monotonic()
data = urllib.request.urlopen(f"http://{host}:{port}/big", timeout=300).read()
elapsed = time.monotonic() - started
latencies = []
addr = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)[0][4]
for _ in range(connects):
    t = time.monotonic()
    s = socket.create_connection(addr, timeout=10)
    latencies.append(time.monotonic() - t)
    s.close()
latencies.sort()
print(len(data), elapsed, latencies[len(latencies) // 2])
"""


async def measure(vm: Sandbox, host: str, port: int, connects: int) -> tuple[float, float]:
    result = await vm.agent.exec("python3").args(["-c", SCRIPT, host, str(port), str(connects)]).run()
    assert result.exit_code == 0, result.stderr
    size, seconds, connect = result.stdout.split()
    assert int(size) == len(PAYLOAD)
    return len(PAYLOAD) / float(seconds) / (1 << 20), float(connect) * 1000


async def first_exec_ms(builder: capsa.SandboxBuilder) -> float:
    started = time.perf_counter()
    vm = await builder.build()
    try:
        assert (await vm.agent.exec("true").run()).exit_code == 0
        return (time.perf_counter() - started) * 1000
    finally:
        await vm.kill()


async def setup_cost(runs: int) -> None:
    net = VirtualNetwork()
    await first_exec_ms(capsa.sandbox().network(net))  # make sure both templates exist
    await first_exec_ms(capsa.sandbox())
    print(f"build() -> first exec, median of {runs} (no network vs network)")
    for label, base in (("cold", capsa.sandbox().cold()), ("template", capsa.sandbox())):
        plain, networked = [], []
        for _ in range(runs):
            plain.append(await first_exec_ms(base))
            networked.append(await first_exec_ms(base.network(net)))
        a, b = statistics.median(plain), statistics.median(networked)
        print(f"  {label:8}  {a:7.0f} ms   with network {b:7.0f} ms   ratio {b / a:5.2f}x")
        figure(f"network_{label}_first_exec_ms", b, "ms")
        figure(f"network_{label}_first_exec_vs_no_network", b / a, "x")


async def main(mib: int, connects: int, runs: int) -> None:
    header("network")
    global PAYLOAD
    PAYLOAD = os.urandom(mib << 20)
    http = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Http)
    http.daemon_threads = True
    threading.Thread(target=http.serve_forever, daemon=True).start()
    port = http.server_address[1]
    dns = DNSServer(LoopbackResolver(), address="127.0.0.1", port=0)
    dns.start_thread()
    gateway = (
        Gateway("10.0.2.0/24")
        .policy(NetworkPolicy.allow_all())
        .dns_servers([f"127.0.0.1:{dns.server.server_address[1]}"])
        .allow_internal_destinations()
    )
    ours = await capsa.sandbox().cold().network(VirtualNetwork.with_gateway(gateway)).build()
    try:
        capsa_mbps, capsa_connect = await measure(ours, "bench.test", port, connects)
    finally:
        await ours.kill()
    # The same sandbox with QEMU's slirp instead: it serves the host's loopback as 10.0.2.2.
    config = await capsa.sandbox().vm_config()
    config = replace(
        config,
        cmdline=(*config.cmdline, ("capsa.ip", "10.0.2.15/24,10.0.2.2")),
        extra_qemu_args=("-netdev", "user,id=slirp0", "-device", "virtio-net-device,netdev=slirp0"),
    )
    slirp = await boot_sandbox(config, 120)
    try:
        slirp_mbps, slirp_connect = await measure(slirp, "10.0.2.2", port, connects)
    finally:
        await slirp.kill()
    http.shutdown()
    dns.stop()
    print(
        f"guest download of {mib} MiB from a host server, and TCP connect latency (median of {connects})"
    )
    print(f"  capsa NAT   {capsa_mbps:7.1f} MiB/s   connect {capsa_connect:6.2f} ms")
    print(f"  QEMU slirp  {slirp_mbps:7.1f} MiB/s   connect {slirp_connect:6.2f} ms")
    print(f"  throughput ratio capsa/slirp {capsa_mbps / slirp_mbps:5.2f}x (goal >= 0.5x); "
          f"connect latency ratio {capsa_connect / slirp_connect:5.2f}x")  # fmt: skip
    figure("network_download_mib_s", capsa_mbps, "MiB/s")
    figure("network_download_vs_slirp", capsa_mbps / slirp_mbps, "x", ">= 0.5")
    figure("network_connect_ms", capsa_connect, "ms")
    await setup_cost(runs)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--connects", type=int, default=50)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(main(args.mib, args.connects, args.runs))
