"""Clusters, side by side in one run: TCP throughput member -> member (through the cluster's switch)
vs the same guest -> a host server (through the NAT); round-trip latency member -> member vs guest ->
gateway (ICMP echo); time to bring up a 4-member cluster from the template vs one sandbox restore.

    .venv/bin/python -m bench.clusters [--mib 64] [--pings 200] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import socketserver
import statistics
import threading
import time

from dnslib.server import DNSServer

import capsa
from bench._report import figure, header
from bench.network import LoopbackResolver
from capsa import Gateway, NetworkPolicy, VirtualNetwork


class _Sink(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        total = 0
        while chunk := self.rfile.read1(1 << 20):
            total += len(chunk)
        self.wfile.write(b"%d\n" % total)


RECEIVE = """
import socket
server = socket.create_server(("0.0.0.0", 9000))
while True:
    conn, _ = server.accept()
    total = 0
    while chunk := conn.recv(1 << 20):
        total += len(chunk)
    conn.sendall(b"%d\\n" % total)
    conn.close()
"""

SEND = """
import socket, sys, time
host, port, mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
block = bytes(1 << 20)
with socket.create_connection((host, port), timeout=60) as conn:
    conn.sendall(block)  # warm up the path before the clock starts
    started = time.monotonic()
    for _ in range(mib):
        conn.sendall(block)
    conn.shutdown(socket.SHUT_WR)
    answer = conn.makefile().readline()
    elapsed = time.monotonic() - started
assert int(answer) == (mib + 1) << 20, answer
print(mib / elapsed)
"""

PING = """
import os, socket, struct, sys, time
def checksum(data):
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    total = (total >> 16) + (total & 0xFFFF)
    return ~(total + (total >> 16)) & 0xFFFF
sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
sock.settimeout(5)
count = int(sys.argv[2])
def ping(seq):
    body = struct.pack("!BBHHH", 8, 0, 0, 77, seq) + b"x" * 56
    sock.sendto(body[:2] + struct.pack("!H", checksum(body)) + body[4:], (sys.argv[1], 0))
    while True:
        reply = sock.recv(2048)
        kind, _, _, ident, number = struct.unpack("!BBHHH", reply[20:28])
        if kind == 0 and number == seq:
            return
ping(0)  # warm up (ARP, code paths)
started = time.monotonic()
for seq in range(1, count + 1):
    ping(seq)
print((time.monotonic() - started) / count * 1000)  # the mean: the guest clock may be coarse
"""


async def run(vm: capsa.Sandbox, script: str, *args: str) -> float:
    result = await vm.agent.exec("python3").args(["-c", script, *args]).timeout(600).run()
    assert result.exit_code == 0, result.stderr
    return float(result.stdout.split()[-1])


async def traffic(net: VirtualNetwork, mib: int, pings: int, sink_port: int) -> None:
    async with capsa.cluster(net) as c:
        a = await c.add("a", capsa.sandbox())
        b = await c.add("b", capsa.sandbox())
        assert isinstance(a, capsa.Sandbox) and isinstance(b, capsa.Sandbox)
        await b.agent.exec("python3").args(["-c", RECEIVE]).spawn()
        await asyncio.sleep(1.0)
        switch = await run(a, SEND, "b", "9000", str(mib))
        nat = await run(a, SEND, "host.test", str(sink_port), str(mib))
        member_rtt = await run(a, PING, c.address("b"), str(pings))
        gateway_rtt = await run(a, PING, str(net.gateway.gateway_ip), str(pings))
    print(f"TCP throughput, {mib} MiB from one guest")
    print(f"  member -> member (switch)   {switch:7.1f} MiB/s")
    print(f"  guest -> host (NAT)         {nat:7.1f} MiB/s")
    print(f"  ratio switch/NAT {switch / nat:5.2f}x (goal >= 1.0x)")
    print(f"ICMP echo round trip, mean of {pings} in a row")
    print(f"  member -> member   {member_rtt:6.3f} ms")
    print(f"  guest -> gateway   {gateway_rtt:6.3f} ms")
    figure("switch_mib_s", switch, "MiB/s")
    figure("nat_mib_s", nat, "MiB/s")
    figure("switch_over_nat", switch / nat, "x", ">= 1.0")
    figure("member_rtt_ms", member_rtt, "ms")
    figure("gateway_rtt_ms", gateway_rtt, "ms")


async def bring_up(net: VirtualNetwork, runs: int) -> None:
    one, four = [], []
    vm = await capsa.sandbox().network(net).build()  # the template exists from here on
    await vm.kill()
    for _ in range(runs):
        started = time.perf_counter()
        vm = await capsa.sandbox().network(net).build()
        one.append(time.perf_counter() - started)
        await vm.kill()
        started = time.perf_counter()
        async with capsa.cluster(net) as c:
            await asyncio.gather(*(c.add(f"m{i}", capsa.sandbox()) for i in range(4)))
            four.append(time.perf_counter() - started)
    a, b = statistics.median(one), statistics.median(four)
    print(f"bring-up from the template, median of {runs}")
    print(f"  one sandbox restore      {a * 1000:7.0f} ms")
    print(f"  4-member cluster         {b * 1000:7.0f} ms   ratio {b / a:5.2f}x (goal <= 4.5x)")
    figure("restore_ms", a * 1000, "ms")
    figure("cluster4_ms", b * 1000, "ms")
    figure("cluster4_over_restore", b / a, "x", "<= 4.5")


async def main(mib: int, pings: int, runs: int) -> None:
    header("clusters")
    sink = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Sink)
    sink.daemon_threads = True
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    dns = DNSServer(LoopbackResolver(), address="127.0.0.1", port=0)
    dns.start_thread()
    gateway = (
        Gateway("10.0.7.0/24")
        .policy(NetworkPolicy.allow_all())
        .dns_servers([f"127.0.0.1:{dns.server.server_address[1]}"])
        .allow_internal_destinations()
    )
    net = VirtualNetwork.with_gateway(gateway)
    try:
        await traffic(net, mib, pings, sink.server_address[1])
        await bring_up(net, runs)
    finally:
        sink.shutdown()
        dns.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--pings", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.mib, args.pings, args.runs))
