"""The DNS proxy against a local upstream resolver on 127.0.0.1: policy, pinning, filtering, no
tunnelling, and garbage from the guest."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import socket
from collections.abc import AsyncIterator, Iterator
from ipaddress import IPv4Address

import pytest
import pytest_asyncio
from dnslib import QTYPE, RCODE, RR, A, DNSRecord

from capsa.net import dns
from capsa.net.dns import DnsEvent, DnsProxy, PinTable
from capsa.net.policy import NetworkPolicy

pytestmark = pytest.mark.asyncio

ZONE = {
    "api.github.com": "140.82.112.3",
    "static.rust-lang.org": "13.0.0.7",
    "intranet.test": "10.1.2.3",
}


class Upstream(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.asked: list[str] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        query = DNSRecord.parse(data)
        name = str(query.q.qname).rstrip(".").lower()
        self.asked.append(name)
        reply = query.reply()
        if name in ZONE:
            reply.add_answer(RR(query.q.qname, QTYPE.A, rdata=A(ZONE[name]), ttl=5))
        else:
            reply.header.rcode = RCODE.NXDOMAIN
        self.transport.sendto(reply.pack(), addr)  # type: ignore[attr-defined]


@pytest_asyncio.fixture
async def upstream() -> AsyncIterator[tuple[Upstream, int]]:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(Upstream, local_addr=("127.0.0.1", 0))
    yield protocol, transport.get_extra_info("sockname")[1]
    transport.close()


def ask(name: str, qtype: str = "A") -> bytes:
    return bytes(DNSRecord.question(name, qtype).pack())


POLICY = NetworkPolicy.deny_all().allow_domain("api.github.com").allow_domain("*.rust-lang.org")


async def test_allowed_names_are_answered_and_pinned(upstream: tuple[Upstream, int]) -> None:
    _, port = upstream
    pins = PinTable()
    events: list[DnsEvent] = []
    proxy = DnsProxy(POLICY, [("127.0.0.1", port)], pins, on_event=events.append)
    reply = DNSRecord.parse(await proxy.handle(ask("API.GitHub.com")))
    assert [str(r.rdata) for r in reply.rr] == ["140.82.112.3"]
    assert pins.names_for(IPv4Address("140.82.112.3")) == {"api.github.com"}
    wildcard = DNSRecord.parse(await proxy.handle(ask("static.rust-lang.org")))
    assert str(wildcard.rr[0].rdata) == "13.0.0.7"
    assert events[0].action == "allow" and events[0].answers == ("140.82.112.3",)
    proxy.close()


async def test_denied_names_get_nxdomain_and_never_leave(upstream: tuple[Upstream, int]) -> None:
    server, port = upstream
    proxy = DnsProxy(POLICY, [("127.0.0.1", port)], PinTable())
    for name in (
        "rust-lang.org",
        "evil-github.com",
        "c2VjcmV0.tunnel.evil.test",
        "github.com.evil.test",
    ):
        reply = DNSRecord.parse(await proxy.handle(ask(name)))
        assert reply.header.rcode == RCODE.NXDOMAIN, name
    txt = DNSRecord.parse(await proxy.handle(ask("api.github.com", "TXT")))
    assert txt.header.rcode == RCODE.REFUSED
    assert server.asked == []  # nothing went upstream
    proxy.close()


async def test_internal_answers_are_removed_unless_allowed(upstream: tuple[Upstream, int]) -> None:
    _, port = upstream
    policy = NetworkPolicy.allow_all()
    strict = DnsProxy(policy, [("127.0.0.1", port)], PinTable())
    assert DNSRecord.parse(await strict.handle(ask("intranet.test"))).header.rcode == RCODE.NXDOMAIN
    lax = DnsProxy(policy, [("127.0.0.1", port)], PinTable(), allow_internal=True)
    assert str(DNSRecord.parse(await lax.handle(ask("intranet.test"))).rr[0].rdata) == "10.1.2.3"
    aaaa = DNSRecord.parse(await lax.handle(ask("api.github.com", "AAAA")))
    assert aaaa.header.rcode == RCODE.NOERROR and not aaaa.rr  # no IPv6 for the guest
    strict.close()
    lax.close()


async def test_garbage_and_dead_upstreams(upstream: tuple[Upstream, int]) -> None:
    proxy = DnsProxy(POLICY, [("127.0.0.1", 9)], PinTable(), timeout=0.3)  # nothing listens on 9
    assert await proxy.handle(b"\x00\x01garbage") is None
    assert await proxy.handle(b"x" * 600) is None
    started = asyncio.get_running_loop().time()
    reply = DNSRecord.parse(await proxy.handle(ask("api.github.com")))
    assert reply.header.rcode == RCODE.SERVFAIL
    assert asyncio.get_running_loop().time() - started < 2
    proxy.close()


async def test_pin_table_is_bounded_and_expires() -> None:
    pins = PinTable(max_entries=3)
    for i in range(5):
        pins.add(f"n{i}.test", IPv4Address("1.1.1.1"), ttl=60, now=0.0)
    assert len(pins) == 3
    assert pins.names_for(IPv4Address("1.1.1.1"), now=1.0) == {"n2.test", "n3.test", "n4.test"}
    assert pins.names_for(IPv4Address("1.1.1.1"), now=1000.0) == frozenset()


# -- bounds: one upstream socket, a cap on questions in flight ---------------------------------------

FLOOD = NetworkPolicy.deny_all().allow_domain("*.flood.test").allow_domain("api.github.com")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def silent_upstream() -> Iterator[int]:
    """A resolver that never answers: every question waits for the full timeout."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


async def test_a_flood_of_questions_keeps_fds_bounded(silent_upstream: int) -> None:
    """Thousands of questions for allowed names to an upstream that never answers: the proxy holds
    one upstream socket, and what exceeds the cap gets SERVFAIL at once instead of waiting."""
    proxy = DnsProxy(FLOOD, [("127.0.0.1", silent_upstream)], PinTable(), timeout=0.5)
    before = open_fds()
    flood = asyncio.gather(*(proxy.handle(ask(f"n{i}.flood.test")) for i in range(2000)))
    await asyncio.sleep(0.2)
    during = open_fds()
    replies = [DNSRecord.parse(r) for r in await flood]
    assert during - before <= 2, (before, during)
    assert all(r.header.rcode == RCODE.SERVFAIL for r in replies)
    proxy.close()


async def test_excess_questions_get_servfail_without_a_task(silent_upstream: int) -> None:
    """``submit`` answers what it can at once and starts at most ``max_pending`` waits."""
    proxy = DnsProxy(FLOOD, [("127.0.0.1", silent_upstream)], PinTable(), timeout=0.5, max_pending=8)
    tasks_before = len(asyncio.all_tasks())
    replies: list[bytes] = []
    for i in range(500):
        proxy.submit(ask(f"n{i}.flood.test"), replies.append)
    assert len(asyncio.all_tasks()) - tasks_before <= 8
    assert len(replies) == 492  # answered synchronously
    assert {DNSRecord.parse(r).header.rcode for r in replies} == {RCODE.SERVFAIL}
    proxy.submit(ask("denied.test"), replies.append)  # local answers need no slot
    assert DNSRecord.parse(replies[-1]).header.rcode == RCODE.NXDOMAIN
    await asyncio.sleep(1.5)
    assert len(replies) == 501 and len(asyncio.all_tasks()) == tasks_before  # the 8 timed out
    proxy.close()


async def test_no_upstream_socket_answers_servfail(upstream: tuple[Upstream, int]) -> None:
    """With the process out of file descriptors, the question is answered SERVFAIL (the task does
    not die with an OSError), and the proxy works again once fds are available."""
    _, port = upstream
    proxy = DnsProxy(POLICY, [("127.0.0.1", port)], PinTable(), timeout=0.5)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (3, hard))
    try:
        with pytest.raises(OSError):
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        reply = await proxy.handle(ask("api.github.com"))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert reply is not None and DNSRecord.parse(reply).header.rcode == RCODE.SERVFAIL
    again = DNSRecord.parse(await proxy.handle(ask("api.github.com")))
    assert [str(r.rdata) for r in again.rr] == ["140.82.112.3"]
    proxy.close()


class Shuffler(asyncio.DatagramProtocol):
    """Collects ``count`` questions, then answers them in reverse order, each preceded by decoys: a
    reply with the right id but another question, and one with another id."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.held: list[tuple[DNSRecord, tuple[str, int]]] = []
        self.ids: set[int] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        query = DNSRecord.parse(data)
        self.ids.add(query.header.id)
        self.held.append((query, addr))
        if len(self.held) < self.count:
            return
        for held, peer in reversed(self.held):
            name = str(held.q.qname).rstrip(".")
            wrong_question = DNSRecord.question("decoy." + name)
            wrong_question.header.id = held.header.id
            decoy = wrong_question.reply()
            decoy.add_answer(RR(wrong_question.q.qname, QTYPE.A, rdata=A("6.6.6.6"), ttl=5))
            wrong_id = held.reply()
            wrong_id.header.id = (held.header.id + 1) & 0xFFFF
            wrong_id.add_answer(RR(held.q.qname, QTYPE.A, rdata=A("6.6.6.7"), ttl=5))
            right = held.reply()
            index = int(name.split(".")[0][1:])
            right.add_answer(RR(held.q.qname, QTYPE.A, rdata=A(f"13.0.0.{index}"), ttl=5))
            for reply in (decoy, wrong_id, right):
                self.transport.sendto(reply.pack(), peer)  # type: ignore[attr-defined]


async def test_answers_are_matched_by_id_and_question() -> None:
    """Concurrent questions share one upstream socket; every answer reaches the question it
    belongs to, and replies with a wrong id or question are ignored."""
    loop = asyncio.get_running_loop()
    transport, shuffler = await loop.create_datagram_endpoint(
        lambda: Shuffler(20), local_addr=("127.0.0.1", 0)
    )
    port = transport.get_extra_info("sockname")[1]
    proxy = DnsProxy(FLOOD, [("127.0.0.1", port)], PinTable(), timeout=2.0)
    questions = [DNSRecord.question(f"n{i}.flood.test") for i in range(20)]
    for question in questions:
        question.header.id = 7  # the guest may reuse ids; the proxy picks its own upstream
    replies = await asyncio.gather(*(proxy.handle(bytes(q.pack())) for q in questions))
    transport.close()
    for i, raw in enumerate(replies):
        reply = DNSRecord.parse(raw)
        assert reply.header.id == 7 and str(reply.q.qname) == f"n{i}.flood.test."
        assert [str(r.rdata) for r in reply.rr] == [f"13.0.0.{i}"]
    assert len(shuffler.ids) == 20  # random ids, distinct while in flight
    proxy.close()


async def test_upstream_socket_rotates_within_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """The shared socket moves to a new random port every ROTATE_SECONDS (an off-path spoofer must
    guess the port too); old sockets close once drained, so the fd count stays bounded."""
    monkeypatch.setattr(dns, "ROTATE_SECONDS", 0.05)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.setblocking(False)
        proxy = DnsProxy(FLOOD, [("127.0.0.1", silent.getsockname()[1])], PinTable(), timeout=0.3)
        before, peak, replies = open_fds(), 0, []
        for i in range(100):  # a second of questions, each waiting the full timeout
            proxy.submit(ask(f"n{i}.flood.test"), replies.append)
            await asyncio.sleep(0.01)
            peak = max(peak, open_fds())
        ports = set()
        with contextlib.suppress(BlockingIOError):
            while True:
                ports.add(silent.recvfrom(512)[1][1])
        proxy.close()
    assert peak - before <= 2 + 0.3 / 0.05, (before, peak)
    assert len(ports) >= 8, ports


async def test_answers_from_another_address_are_ignored() -> None:
    """A spoofed answer with the right id and question, sent from any address but the upstream's,
    is not taken; the upstream's own answer is."""
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as upstream,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as spoofer,
    ):
        upstream.bind(("127.0.0.1", 0))
        upstream.setblocking(False)
        spoofer.bind(("127.0.0.1", 0))
        proxy = DnsProxy(FLOOD, [("127.0.0.1", upstream.getsockname()[1])], PinTable(), timeout=1.0)
        pending = asyncio.ensure_future(proxy.handle(ask("api.github.com")))
        loop = asyncio.get_running_loop()
        data, proxy_address = await loop.sock_recvfrom(upstream, 512)
        forwarded = DNSRecord.parse(data)
        for source, address in ((spoofer, "6.6.6.6"), (upstream, "140.82.112.3")):
            answer = forwarded.reply()
            answer.add_answer(RR(forwarded.q.qname, QTYPE.A, rdata=A(address), ttl=60))
            source.sendto(answer.pack(), proxy_address)
            await asyncio.sleep(0.05)
        reply = DNSRecord.parse(await pending)
        proxy.close()
    assert [str(r.rdata) for r in reply.rr] == ["140.82.112.3"]


class Held(asyncio.DatagramProtocol):
    """An upstream that answers only when told: the policy can change while a question waits."""

    def __init__(self) -> None:
        self.waiting: list[tuple[bytes, tuple[str, int]]] = []
        self.arrived = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        query = DNSRecord.parse(data)
        reply = query.reply()
        reply.add_answer(RR(query.q.qname, QTYPE.A, rdata=A("140.82.112.3"), ttl=5))
        self.waiting.append((bytes(reply.pack()), addr))
        self.arrived.set()

    def release(self) -> None:
        for packet, addr in self.waiting:
            self.transport.sendto(packet, addr)  # type: ignore[attr-defined]


async def test_a_policy_change_judges_questions_in_flight_and_new_ones() -> None:
    """``set_policy`` while a question waits upstream: its answer is not given (NXDOMAIN) if the
    new policy denies the name, and no pin is kept; new questions follow the new policy."""
    loop = asyncio.get_running_loop()
    transport, held = await loop.create_datagram_endpoint(Held, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    pins = PinTable()
    proxy = DnsProxy(NetworkPolicy.allow_all(), [("127.0.0.1", port)], pins, timeout=5.0)
    pending = asyncio.ensure_future(proxy.handle(ask("api.github.com")))
    await asyncio.wait_for(held.arrived.wait(), 5)
    denied = NetworkPolicy.allow_all().deny_domain("api.github.com")
    proxy.set_policy(denied)
    assert proxy.policy is denied
    held.release()
    reply = DNSRecord.parse(await asyncio.wait_for(pending, 5))
    assert reply.header.rcode == RCODE.NXDOMAIN and not reply.rr
    assert not pins.names_for(IPv4Address("140.82.112.3"))
    again = DNSRecord.parse(await proxy.handle(ask("api.github.com")))
    assert again.header.rcode == RCODE.NXDOMAIN and len(held.waiting) == 1  # never asked upstream
    proxy.set_policy(NetworkPolicy.allow_all())
    allowed = asyncio.ensure_future(proxy.handle(ask("api.github.com")))
    while len(held.waiting) < 2:
        await asyncio.sleep(0.01)
    held.release()
    assert [str(r.rdata) for r in DNSRecord.parse(await asyncio.wait_for(allowed, 5)).rr] == [
        "140.82.112.3"
    ]
    transport.close()
    proxy.close()
