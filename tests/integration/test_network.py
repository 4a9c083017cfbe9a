"""The virtual network on real guests, offline: a local DNS server (the gateway's upstream) maps test
names to 127.0.0.1, where HTTP and UDP servers listen; the guest reaches them only through capsa's NAT
and only as the policy allows."""

from __future__ import annotations

import hashlib
import os
import socket
import socketserver
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from dnslib import QTYPE, RR, A
from dnslib.server import BaseResolver, DNSServer

import capsa
from capsa import Gateway, NetworkPolicy, VirtualNetwork
from tests.conftest import SandboxFactory, VMFactory

pytestmark = [pytest.mark.vm]

NAMES = ("api.github.test", "static.rust-lang.test", "rust-lang.test", "evil-github.test",
         "api.github.test.evil.test", "udp.test", "data.test")  # fmt: skip
BIG = os.urandom(100 << 20)


class _Resolver(BaseResolver):
    def __init__(self) -> None:
        self.asked: list[str] = []

    def resolve(self, request, handler):  # type: ignore[no-untyped-def]
        name = str(request.q.qname).rstrip(".").lower()
        self.asked.append(name)
        reply = request.reply()
        if name in NAMES and request.q.qtype == QTYPE.A:
            reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A("127.0.0.1"), ttl=60))
        return reply


class _Http(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        line = self.rfile.readline()
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass
        body = BIG if b"/big" in line else b"hello from the host"
        self.wfile.write(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)


class _UdpEcho(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        data, sock = self.request
        sock.sendto(b"echo:" + data, self.client_address)


@dataclass
class Servers:
    dns_port: int
    http_port: int
    udp_port: int
    resolver: _Resolver

    def gateway(self, policy: NetworkPolicy) -> Gateway:
        return (
            Gateway("10.0.2.0/24")
            .policy(policy)
            .dns_servers([f"127.0.0.1:{self.dns_port}"])
            .allow_internal_destinations()
        )


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    resolver = _Resolver()
    dns = DNSServer(resolver, address="127.0.0.1", port=_free_udp_port())
    dns.start_thread()
    http = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Http)
    http.daemon_threads = True
    udp = socketserver.ThreadingUDPServer(("127.0.0.1", 0), _UdpEcho)
    for server in (http, udp):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield Servers(dns.server.server_address[1], http.server_address[1], udp.server_address[1], resolver)
    for server in (http, udp):
        server.shutdown()
        server.server_close()
    dns.stop()


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


PROBE = """
import socket, sys, time, urllib.request
for url in sys.argv[1:]:
    started = time.monotonic()
    try:
        body = urllib.request.urlopen(url, timeout=20).read()
        print(url, "ok", len(body), round(time.monotonic() - started, 2))
    except Exception as exc:
        print(url, "failed", type(exc).__name__, round(time.monotonic() - started, 2))
"""


async def probe(vm: capsa.Sandbox, *urls: str) -> dict[str, tuple[str, float]]:
    result = await vm.agent.exec("python3").args(["-c", PROBE, *urls]).timeout(120).run()
    assert result.exit_code == 0, result.stderr
    outcome = {}
    for line in result.stdout.splitlines():
        url, status, *rest = line.split()
        outcome[url] = (status, float(rest[-1]))
    return outcome


@pytest.mark.asyncio
async def test_allowlist_pinning_and_the_egress_log(
    servers: Servers, sandbox_factory: SandboxFactory
) -> None:
    policy = NetworkPolicy.deny_all().allow_domain("api.github.test").allow_domain("*.rust-lang.test")
    vm = await sandbox_factory(
        capsa.sandbox().network(VirtualNetwork.with_gateway(servers.gateway(policy)))
    )
    port = servers.http_port
    urls = {name: f"http://{name}:{port}/" for name in NAMES if name not in ("udp.test", "data.test")}
    urls["literal public IP"] = f"http://203.0.113.5:{port}/"
    urls["unresolved stand-in"] = f"http://198.18.0.200:{port}/"
    outcome = await probe(vm, *urls.values())
    assert outcome[urls["api.github.test"]][0] == "ok"
    assert outcome[urls["static.rust-lang.test"]][0] == "ok"
    for denied in ("rust-lang.test", "evil-github.test", "api.github.test.evil.test",
                   "literal public IP", "unresolved stand-in"):  # fmt: skip
        status, seconds = outcome[urls[denied]]
        assert status == "failed" and seconds < 5, (denied, status, seconds)  # fast, not a hang
    for never_forwarded in ("rust-lang.test", "evil-github.test", "api.github.test.evil.test"):
        assert never_forwarded not in servers.resolver.asked  # NXDOMAIN locally: no tunnelling
    entries = vm.network.log()
    allowed = [e for e in entries if e.proto == "tcp" and e.action == "allow"]
    assert {e.domain for e in allowed} >= {"api.github.test"}
    assert any(e.proto == "tcp" and e.action == "deny" and e.dst_ip == "203.0.113.5" for e in entries)
    assert any(
        e.proto == "dns" and e.action == "deny" and e.domain == "evil-github.test" for e in entries
    )


@pytest.mark.asyncio
async def test_deny_all_allow_all_udp_and_a_large_download(
    servers: Servers, sandbox_factory: SandboxFactory
) -> None:
    locked = await sandbox_factory(
        capsa.sandbox().network(VirtualNetwork.with_gateway(servers.gateway(NetworkPolicy.deny_all())))
    )
    outcome = await probe(locked, f"http://api.github.test:{servers.http_port}/")
    assert next(iter(outcome.values()))[0] == "failed"

    open_net = VirtualNetwork.with_gateway(servers.gateway(NetworkPolicy.allow_all()))
    vm = await sandbox_factory(capsa.sandbox().network(open_net))
    download = (
        "import hashlib, urllib.request;"
        f"print(hashlib.sha256(urllib.request.urlopen('http://data.test:{servers.http_port}/big',"
        " timeout=120).read()).hexdigest())"
    )
    digest = await vm.agent.exec("python3").args(["-c", download]).timeout(300).run()
    assert digest.stdout.strip() == hashlib.sha256(BIG).hexdigest(), digest.stderr
    udp = (
        "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(10);"
        f"s.connect(('udp.test', {servers.udp_port})); s.send(b'ping'); print(s.recv(100))"
    )
    echoed = await vm.agent.exec("python3").args(["-c", udp]).timeout(60).run()
    assert echoed.stdout.strip() == "b'echo:ping'", echoed.stderr


@pytest.mark.asyncio
async def test_raw_vm_gets_a_lease_by_dhcp_and_pings_the_gateway(vm_factory: VMFactory) -> None:
    from capsa.image.busybox import PROMPT, READY_MARKER, busybox_guest
    from capsa.image.kernels import default_kernel

    guest = busybox_guest(kernel=default_kernel())
    vm = await vm_factory(
        capsa.vm(capsa.LinuxDirectBoot(guest.kernel, guest.initrd)).network(VirtualNetwork())
    )
    await vm.console.wait_for(READY_MARKER, timeout=60)
    await vm.console.wait_for(PROMPT, timeout=30)
    lease = await vm.console.exec_line(
        "ip link set eth0 up; udhcpc -i eth0 -n -q -f -s /bin/true 2>&1", 60
    )
    assert "10.0.2.2" in lease
    await vm.console.exec_line("ip addr add 10.0.2.2/24 dev eth0")
    assert "1 packets received" in await vm.console.exec_line("ping -c 1 -W 5 10.0.2.1", 30)


CONCURRENT = """
import asyncio, sys
async def one(host, port):
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"GET / HTTP/1.0\\r\\n\\r\\n")
    body = await reader.read()
    writer.close()
    return body.endswith(b"hello from the host")
async def main():
    results = await asyncio.gather(*(one(sys.argv[1], int(sys.argv[2])) for _ in range(200)))
    print(sum(results))
asyncio.run(main())
"""


@pytest.mark.asyncio
async def test_concurrent_connections_and_denied_udp(
    servers: Servers, sandbox_factory: SandboxFactory
) -> None:
    policy = NetworkPolicy.deny_all().allow_domain("api.github.test")
    vm = await sandbox_factory(
        capsa.sandbox().network(VirtualNetwork.with_gateway(servers.gateway(policy)))
    )
    many = (
        await vm.agent.exec("python3")
        .args(["-c", CONCURRENT, "api.github.test", str(servers.http_port)])
        .timeout(180)
        .run()
    )
    assert many.stdout.strip() == "200", many.stderr
    denied_udp = (
        "import socket, time; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(10);"
        "s.connect(('203.0.113.5', 9)); t = time.monotonic(); s.send(b'x')\n"
        "try:\n    s.recv(10); print('answered')\n"
        "except ConnectionRefusedError:\n    print('refused', round(time.monotonic() - t, 2))"
    )
    refused = await vm.agent.exec("python3").args(["-c", denied_udp]).timeout(60).run()
    assert refused.stdout.startswith("refused"), (refused.stdout, refused.stderr)
    assert float(refused.stdout.split()[1]) < 5  # an ICMP unreachable, not a silent drop
    assert any(e.proto == "udp" and e.action == "deny" for e in vm.network.log())


GUEST_SERVERS = """
import socket, threading
tcp = socket.socket(); tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
tcp.bind(("0.0.0.0", 8000)); tcp.listen(8)
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); udp.bind(("0.0.0.0", 5353))
def serve(conn, peer):
    conn.sendall(("from " + peer[0] + "\\n").encode())
    while data := conn.recv(65536):
        conn.sendall(data.upper())
    conn.sendall(b"BYE")
    conn.close()
def echo():
    while True:
        data, peer = udp.recvfrom(65536)
        udp.sendto(b"guest:" + data, peer)
threading.Thread(target=echo, daemon=True).start()
print("ready", flush=True)
while True:
    threading.Thread(target=serve, args=tcp.accept(), daemon=True).start()
"""


@pytest.mark.asyncio
async def test_port_forwards_carry_data_both_ways(sandbox_factory: SandboxFactory) -> None:
    import asyncio

    gateway = Gateway("10.0.2.0/24").forward_tcp(0, 8000).forward_udp(0, 5353).forward_tcp(0, 9)
    vm = await sandbox_factory(capsa.sandbox().network(VirtualNetwork.with_gateway(gateway)))
    tcp_port, udp_port, closed_port = (f.host_port for f in vm.network.forwards())
    server = await vm.agent.exec("python3").args(["-u", "-c", GUEST_SERVERS]).spawn()
    assert (await asyncio.wait_for(server.stdout.readline(), 60)).strip() == b"ready"

    payload = os.urandom(4 << 20).hex().encode()  # 8 MiB of lower-case hex, upper-cased back
    reader, writer = await asyncio.open_connection("127.0.0.1", tcp_port)
    assert await asyncio.wait_for(reader.readline(), 30) == b"from 10.0.2.1\n"

    async def send() -> None:
        writer.write(payload)
        await writer.drain()
        writer.write_eof()  # half-close: the guest still answers after our FIN

    sender = asyncio.ensure_future(send())
    echoed = await asyncio.wait_for(reader.read(), 120)
    await sender
    writer.close()
    assert echoed == payload.upper() + b"BYE"

    loop = asyncio.get_running_loop()
    replies: asyncio.Queue[bytes] = asyncio.Queue()

    class Client(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: object) -> None:
            replies.put_nowait(data)

    transport, _ = await loop.create_datagram_endpoint(Client, remote_addr=("127.0.0.1", udp_port))
    for n in range(3):
        transport.sendto(b"hello %d" % n)
        assert await asyncio.wait_for(replies.get(), 30) == b"guest:hello %d" % n
    transport.close()

    started = loop.time()  # nothing listens on guest port 9: the guest's RST closes us at once
    reader, writer = await asyncio.open_connection("127.0.0.1", closed_port)
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()
    assert loop.time() - started < 5
    forwards = [e for e in vm.network.log() if e.rule.startswith("forward from 127.0.0.1")]
    assert {(e.proto, e.dst_port) for e in forwards} == {("tcp", 8000), ("udp", 5353), ("tcp", 9)}
    await server.kill()


def test_a_forwarded_host_port_in_use_fails_the_build() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        gateway = Gateway("10.0.2.0/24").forward_tcp(port, 80)
        with pytest.raises(capsa.ConfigError, match="in use"):
            capsa.sync.sandbox().network(VirtualNetwork.with_gateway(gateway)).build()


FLOOD = """
import asyncio, sys
async def one(host, port):
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 30)
        return writer
    except ConnectionRefusedError:
        return None
async def main():
    writers = await asyncio.gather(*(one(sys.argv[1], int(sys.argv[2])) for _ in range(600)))
    print(sum(w is not None for w in writers), sum(w is None for w in writers))
    for w in writers:
        if w is not None:
            w.close()
            await w.wait_closed()
    await asyncio.sleep(2)
    again = await one(sys.argv[1], int(sys.argv[2]))
    print("again", again is not None)
asyncio.run(main())
"""


@pytest.mark.asyncio
async def test_the_per_vm_flow_cap(servers: Servers, sandbox_factory: SandboxFactory) -> None:
    """600 connections held open: 512 go through, the rest are refused at once, and closing them
    frees the slots. Host descriptors stay bounded by the cap."""
    import asyncio

    from capsa.net.stack import MAX_FLOWS

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the guest closes
        writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0, backlog=1024)
    port = server.sockets[0].getsockname()[1]
    gateway = servers.gateway(NetworkPolicy.allow_all())
    vm = await sandbox_factory(capsa.sandbox().network(VirtualNetwork.with_gateway(gateway)))
    fds_before = len(os.listdir("/proc/self/fd"))
    flood = vm.agent.exec("python3").args(["-c", FLOOD, "data.test", str(port)])
    result = await flood.timeout(240).run()
    server.close()
    lines = result.stdout.split("\n")
    assert lines[0].split() == [str(MAX_FLOWS), str(600 - MAX_FLOWS)], (result.stdout, result.stderr)
    assert lines[1] == "again True"
    assert len(os.listdir("/proc/self/fd")) <= fds_before + 8


LINK = "cat /sys/class/net/eth0/address; ip -o -4 addr show dev eth0 | awk '{print $4}'; ip route"


@pytest.mark.asyncio
async def test_restored_and_forked_sandboxes_get_their_own_link_identity(
    servers: Servers, sandbox_factory: SandboxFactory
) -> None:
    """Templates and forks carry the MAC and address of the VM they were taken from; each restore
    takes the identity its own network stack expects, and egress and forwards work on it."""
    import asyncio

    policy = NetworkPolicy.deny_all().allow_domain("api.github.test")
    with socket.socket() as spare:
        spare.bind(("127.0.0.1", 0))
        fixed = spare.getsockname()[1]
    gateway = servers.gateway(policy).forward_tcp(fixed, 8000)
    vm = await sandbox_factory(capsa.sandbox().network(VirtualNetwork.with_gateway(gateway)))
    first, second = await vm.fork(2)
    try:
        links = []
        for sb in (vm, first, second):
            shown = await sb.agent.exec("sh").args(["-c", LINK]).timeout(30).run()
            mac, address, *routes = [line.strip() for line in shown.stdout.splitlines()]
            identity = sb.network.identity()
            assert (mac, address) == (identity["mac"], identity["address"]), shown.stdout
            assert "default via 10.0.2.1 dev eth0" in routes
            links.append((mac, address))
            outcome = await probe(sb, f"http://api.github.test:{servers.http_port}/")
            assert next(iter(outcome.values()))[0] == "ok"
        assert len({mac for mac, _ in links}) == 3 and len({ip for _, ip in links}) == 3

        server = await second.agent.exec("python3").args(["-u", "-c", GUEST_SERVERS]).spawn()
        assert (await asyncio.wait_for(server.stdout.readline(), 60)).strip() == b"ready"
        assert [f.host_port for f in vm.network.forwards()] == [fixed]  # the parent keeps its port
        (forward,) = second.network.forwards()
        assert forward.host_port not in (0, fixed)  # a fork's forward gets a free port of its own
        reader, writer = await asyncio.open_connection("127.0.0.1", forward.host_port)
        assert await asyncio.wait_for(reader.readline(), 30) == b"from 10.0.2.1\n"
        writer.write(b"fork")
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 30) == b"FORKBYE"
        writer.close()
        await server.kill()
    finally:
        for clone in (first, second):
            await clone.kill()
