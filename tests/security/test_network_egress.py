"""Attacks on network egress from real guests: reaching the host's own services through one of its
interface addresses (directly or through DNS answers), and TCP flows that the NAT no longer knows or
never opened (after a restore; to a blackholed host) left hanging instead of failing.

The host-address attack runs in a network namespace the test makes itself (``unshare -n``): a veth
pair holds 203.0.113.7 there, a server listens on 0.0.0.0, and this very file, run as a module
inside the namespace, boots the sandbox, so QEMU and capsa's network stack see that namespace's
interfaces as "the host's". The other tests use only 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import socketserver
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from dnslib import QTYPE, RR, A
from dnslib.server import BaseResolver, DNSServer

import capsa
from capsa import Gateway, VirtualNetwork
from capsa.net import nat
from tests.conftest import SandboxFactory

pytestmark = [pytest.mark.vm]

ROOT = Path(__file__).resolve().parents[2]
HOST_ADDRESS = "203.0.113.7"  # TEST-NET-3: only ever inside the test's own network namespace
OTHER_ADDRESS = "198.51.100.20"  # TEST-NET-2: an ordinary outside address, never contacted


class _Resolver(BaseResolver):
    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers

    def resolve(self, request, handler):  # type: ignore[no-untyped-def]
        name = str(request.q.qname).rstrip(".").lower()
        reply = request.reply()
        if request.q.qtype == QTYPE.A:
            for address in self.answers.get(name, []):
                reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(address), ttl=60))
        return reply


def _dns(answers: dict[str, list[str]]) -> DNSServer:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as spare:
        spare.bind(("127.0.0.1", 0))
        port = spare.getsockname()[1]
    server = DNSServer(_Resolver(answers), address="127.0.0.1", port=port)
    server.start_thread()
    return server


# -- 1. the host's own addresses (inside a network namespace) --------------------------------------

GUEST_PROBE = r"""
import json, socket, sys, time
host, tcp_port, udp_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
out = {}
started = time.monotonic()
try:
    s = socket.create_connection((host, tcp_port), timeout=8)
    s.settimeout(3)
    try:
        out["tcp"] = ["connected", s.recv(100).decode(errors="replace")]
    except OSError as exc:
        out["tcp"] = ["connected", type(exc).__name__]
except OSError as exc:
    out["tcp"] = [type(exc).__name__]
out["tcp_seconds"] = round(time.monotonic() - started, 2)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(3)
u.connect((host, udp_port))
try:
    u.send(b"probe")
    out["udp"] = u.recv(100).decode(errors="replace")
except OSError as exc:
    out["udp"] = type(exc).__name__
for name in ("host.test", "mixed.test"):
    try:
        out[name] = sorted(socket.gethostbyname_ex(name)[2])
    except OSError as exc:
        out[name] = type(exc).__name__
print(json.dumps(out))
"""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, timeout=10)


async def _in_namespace() -> dict[str, object]:
    """Runs inside the namespace: an interface holding HOST_ADDRESS, services on 0.0.0.0 that record
    every visitor, a resolver pointing names at HOST_ADDRESS, and a sandbox allowed everything."""
    _ip("link", "set", "lo", "up")
    _ip("link", "add", "capsa0", "type", "veth", "peer", "name", "capsa1")
    _ip("addr", "add", f"{HOST_ADDRESS}/24", "dev", "capsa0")
    _ip("link", "set", "capsa0", "up")
    _ip("link", "set", "capsa1", "up")
    seen: list[str] = []
    tcp = socket.create_server(("0.0.0.0", 0))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("0.0.0.0", 0))

    def serve_tcp() -> None:
        while True:
            conn, peer = tcp.accept()
            seen.append(f"tcp from {peer[0]}")
            conn.sendall(b"the host's private service\n")
            conn.close()

    def serve_udp() -> None:
        while True:
            _, peer = udp.recvfrom(100)
            seen.append(f"udp from {peer[0]}")
            udp.sendto(b"the host's private service", peer)

    for target in (serve_tcp, serve_udp):
        threading.Thread(target=target, daemon=True).start()
    tcp_port, udp_port = tcp.getsockname()[1], udp.getsockname()[1]
    with socket.create_connection((HOST_ADDRESS, tcp_port), timeout=5) as control:
        assert control.recv(100)  # the service is there for whoever reaches the address
    for _ in range(500):
        if seen:
            break
        await asyncio.sleep(0.01)
    assert seen, "the control connection was not recorded"
    seen.clear()
    dns = _dns({"host.test": [HOST_ADDRESS], "mixed.test": [HOST_ADDRESS, OTHER_ADDRESS]})
    gateway = Gateway().dns_servers([f"127.0.0.1:{dns.server.server_address[1]}"])  # allow all
    try:
        async with await capsa.sandbox().network(VirtualNetwork.with_gateway(gateway)).build(120) as vm:
            args = ["-c", GUEST_PROBE, HOST_ADDRESS, str(tcp_port), str(udp_port)]
            result = await vm.agent.exec("python3").args(args).timeout(90).run()
            log = [(e.proto, e.dst_ip, e.action, e.rule) for e in vm.network.log()]
    finally:
        dns.stop()
    await asyncio.sleep(0.5)  # anything that got through has reached the servers by now
    return {"guest": result.stdout, "stderr": result.stderr, "seen": seen, "log": log}


@pytest.mark.timeout(180)
def test_the_guest_cannot_reach_the_hosts_own_address() -> None:
    """Attack: with egress allowed to everything, the guest connects (TCP and UDP) to the host's own
    interface address, a public-looking one, and reaches services the host binds on 0.0.0.0; or a
    DNS answer the attacker controls points an allowed name at that address."""
    unshare = ["unshare", "-n"] if os.geteuid() == 0 else ["unshare", "-rn"]
    command = [*unshare, sys.executable, "-m", "tests.security.test_network_egress"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=170, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-4000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    guest = json.loads(result["guest"])
    assert result["seen"] == [], result  # the host's services saw nobody
    assert guest["tcp"] == ["ConnectionRefusedError"], guest
    assert guest["tcp_seconds"] < 5, guest
    assert guest["udp"] == "ConnectionRefusedError", guest  # an ICMP unreachable, not a drop
    assert guest["host.test"] == "gaierror", guest  # the only answer was the host: NXDOMAIN
    assert guest["mixed.test"] == [OTHER_ADDRESS], guest  # the host's address is filtered out
    denials = {(proto, rule) for proto, dst, action, rule in result["log"] if dst == HOST_ADDRESS}
    assert denials == {("tcp", "internal destination"), ("udp", "internal destination")}, result


# -- 6. flows the NAT does not know, or never opened ---------------------------------------------


class _Echo(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        while line := self.rfile.readline():
            self.wfile.write(line)


@dataclass
class Local:
    dns_port: int
    echo_port: int
    blackhole_port: int

    def network(self) -> VirtualNetwork:
        gateway = Gateway().dns_servers([f"127.0.0.1:{self.dns_port}"]).allow_internal_destinations()
        return VirtualNetwork.with_gateway(gateway)


@pytest.fixture(scope="module")
def local() -> Iterator[Local]:
    """On 127.0.0.1: a resolver, an echo server, and a listener whose accept queue is full, so it
    drops every SYN (a host that never answers, made with loopback only)."""
    dns = _dns({"server.test": ["127.0.0.1"], "blackhole.test": ["127.0.0.1"]})
    echo = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    echo.daemon_threads = True
    threading.Thread(target=echo.serve_forever, daemon=True).start()
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(0)
    port = blackhole.getsockname()[1]
    fillers: list[socket.socket] = []
    while True:
        filler = socket.socket()
        filler.settimeout(0.5)
        try:
            filler.connect(("127.0.0.1", port))
        except TimeoutError:
            filler.close()
            break
        fillers.append(filler)
        assert len(fillers) < 64, "the listener keeps accepting"
    try:
        yield Local(dns.server.server_address[1], echo.server_address[1], port)
    finally:
        for sock in (*fillers, blackhole):
            sock.close()
        echo.shutdown()
        echo.server_close()
        dns.stop()


CONNECT = r"""
import socket, sys, time
started = time.monotonic()
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
except OSError as exc:
    print(type(exc).__name__, round(time.monotonic() - started, 2))
    sys.exit()
s.settimeout(5)
try:
    s.sendall(b"hello\n")
    outcome = "connected-then-" + (s.recv(100).decode() or "eof")
except OSError as exc:
    outcome = "connected-then-" + type(exc).__name__
print(outcome, round(time.monotonic() - started, 2))
"""


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_a_connect_to_a_host_that_never_answers_fails_and_never_looks_open(
    local: Local, sandbox_factory: SandboxFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hazard a guest can cause: its SYN retransmitted while the NAT's host connect was pending got
    a SYN-ACK, so a connection to a blackholed host looked open and then hung (the later RST, with
    sequence 0, was dropped by the guest)."""
    monkeypatch.setattr(nat, "CONNECT_TIMEOUT", 3.0)  # the guest retransmits its SYN after 1 s
    vm = await sandbox_factory(capsa.sandbox().network(local.network()))
    args = ["-c", CONNECT, "blackhole.test", str(local.blackhole_port)]
    result = await vm.agent.exec("python3").args(args).timeout(60).run()
    outcome, seconds = result.stdout.split()
    assert outcome in ("ConnectionRefusedError", "TimeoutError"), (result.stdout, result.stderr)
    assert float(seconds) < 3.0 + 2, result.stdout
    control = await vm.agent.exec("python3").args(["-c", CONNECT, "server.test",
                                                   str(local.echo_port)]).timeout(60).run()  # fmt: skip
    assert control.stdout.split()[0] == "connected-then-hello", control.stdout


HOLDER = r"""
import os, socket, sys, time
if os.fork():
    os._exit(0)
os.setsid()
null = os.open(os.devnull, os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(null, fd)
def write(name, text):
    with open(name + ".tmp", "w") as f:
        f.write(text)
    os.rename(name + ".tmp", name)
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
    s.settimeout(20)
    s.sendall(b"before\n")
    write("/tmp/held", s.recv(100).decode())
except OSError as exc:
    write("/tmp/held", "failed " + type(exc).__name__)
    sys.exit()
while not os.path.exists("/tmp/go"):
    time.sleep(0.02)
started = time.monotonic()
s.settimeout(15)
try:
    s.sendall(b"after\n")
    data = s.recv(100)
    outcome = "data:" + data.decode().strip() if data else "eof"
except OSError as exc:
    outcome = type(exc).__name__
write("/tmp/outcome", f"{outcome}|{time.monotonic() - started:.2f}")
"""


async def _wait_for_file(vm: capsa.Sandbox, path: str, timeout: float) -> str:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await vm.agent.exists(path):
        assert loop.time() < deadline, f"{path} did not appear within {timeout} s"
        await asyncio.sleep(0.1)
    return (await vm.agent.read_file(path)).decode()


@pytest.mark.asyncio
@pytest.mark.timeout(180)
async def test_a_connection_open_across_a_restore_fails_at_once_in_the_restored_guest(
    local: Local, sandbox_factory: SandboxFactory, tmp_path: Path
) -> None:
    """Hazard: a restored guest's TCP connection is unknown to its new NAT. The NAT's RST carried
    sequence 0, outside the guest's window, so the guest dropped it and the connection hung."""
    network = local.network()
    vm = await sandbox_factory(capsa.sandbox().network(network))
    started = await vm.agent.exec("python3").args(["-c", HOLDER, "server.test",
                                                   str(local.echo_port)]).timeout(30).run()  # fmt: skip
    assert started.exit_code == 0, started.stderr
    assert await _wait_for_file(vm, "/tmp/held", 30) == "before\n"
    snap = await vm.snapshot(tmp_path / "snap")
    restored = await sandbox_factory(capsa.sandbox().from_snapshot(snap).network(network))
    await restored.agent.write_file("/tmp/go", b"")
    outcome, seconds = (await _wait_for_file(restored, "/tmp/outcome", 20)).split("|")
    assert outcome == "ConnectionResetError" and float(seconds) < 5, (outcome, seconds)
    await vm.agent.write_file("/tmp/go", b"")  # the original's connection is alive and well
    outcome, _ = (await _wait_for_file(vm, "/tmp/outcome", 20)).split("|")
    assert outcome == "data:after", outcome


if __name__ == "__main__":  # the host-address attack's own namespace runs this
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    print("RESULT " + json.dumps(asyncio.run(_in_namespace())), flush=True)
