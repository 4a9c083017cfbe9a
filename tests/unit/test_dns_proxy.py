"""The DNS proxy against a local upstream resolver on 127.0.0.1: policy, pinning, filtering, no
tunnelling, and garbage from the guest."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from ipaddress import IPv4Address

import pytest
import pytest_asyncio
from dnslib import QTYPE, RCODE, RR, A, DNSRecord

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


async def test_internal_answers_are_removed_unless_allowed(upstream: tuple[Upstream, int]) -> None:
    _, port = upstream
    policy = NetworkPolicy.allow_all()
    strict = DnsProxy(policy, [("127.0.0.1", port)], PinTable())
    assert DNSRecord.parse(await strict.handle(ask("intranet.test"))).header.rcode == RCODE.NXDOMAIN
    lax = DnsProxy(policy, [("127.0.0.1", port)], PinTable(), allow_internal=True)
    assert str(DNSRecord.parse(await lax.handle(ask("intranet.test"))).rr[0].rdata) == "10.1.2.3"
    aaaa = DNSRecord.parse(await lax.handle(ask("api.github.com", "AAAA")))
    assert aaaa.header.rcode == RCODE.NOERROR and not aaaa.rr  # no IPv6 for the guest


async def test_garbage_and_dead_upstreams(upstream: tuple[Upstream, int]) -> None:
    proxy = DnsProxy(POLICY, [("127.0.0.1", 9)], PinTable(), timeout=0.3)  # nothing listens on 9
    assert await proxy.handle(b"\x00\x01garbage") is None
    assert await proxy.handle(b"x" * 600) is None
    started = asyncio.get_running_loop().time()
    reply = DNSRecord.parse(await proxy.handle(ask("api.github.com")))
    assert reply.header.rcode == RCODE.SERVFAIL
    assert asyncio.get_running_loop().time() - started < 2


async def test_pin_table_is_bounded_and_expires() -> None:
    pins = PinTable(max_entries=3)
    for i in range(5):
        pins.add(f"n{i}.test", IPv4Address("1.1.1.1"), ttl=60, now=0.0)
    assert len(pins) == 3
    assert pins.names_for(IPv4Address("1.1.1.1"), now=1.0) == {"n2.test", "n3.test", "n4.test"}
    assert pins.names_for(IPv4Address("1.1.1.1"), now=1000.0) == frozenset()
