"""The gateway's DNS proxy: policy on names, pinning of answers, no tunnelling.

Every question from the guest is judged by :meth:`NetworkPolicy.decide_name` first. Denied names get
NXDOMAIN from here and never reach an upstream resolver, so DNS cannot carry data past the policy.
Allowed ``A`` questions are forwarded; the addresses in the answer are recorded in the VM's
:class:`PinTable` (domain rules later match only those addresses) and addresses in internal ranges
are removed unless the gateway allows internal destinations. ``AAAA`` gets an empty answer (the guest
has no IPv6 route). Wire format: ``dnslib``; nothing from the guest is trusted.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dnslib import QTYPE, RCODE, A, DNSRecord

from capsa.net.policy import NetworkPolicy, is_internal, normalize_name

log = logging.getLogger(__name__)

MAX_PINS = 4096
MIN_PIN_SECONDS = 30  # a short TTL must not break a connection opened right after the answer
MAX_QUERY = 512
UPSTREAM_TIMEOUT = 2.0


class LoopbackMap:
    """Host loopback addresses as the guest sees them. A guest connecting to 127.0.0.1 reaches its
    own loopback, so when DNS (with internal destinations allowed) answers with a host loopback
    address, the guest gets a stand-in from 198.18.0.0/15 instead and the NAT connects to the real
    one. Bounded like the pin table."""

    BASE = ipaddress.IPv4Address("198.18.0.1")
    SIZE = 1 << 16

    def __init__(self) -> None:
        self._to_guest: dict[ipaddress.IPv4Address, ipaddress.IPv4Address] = {}
        self._to_host: dict[ipaddress.IPv4Address, ipaddress.IPv4Address] = {}

    def guest_address(self, host: ipaddress.IPv4Address) -> ipaddress.IPv4Address | None:
        if host not in self._to_guest:
            if len(self._to_guest) >= self.SIZE:
                return None
            stand_in = self.BASE + len(self._to_guest)
            self._to_guest[host] = stand_in
            self._to_host[stand_in] = host
        return self._to_guest[host]

    def host_address(self, guest: ipaddress.IPv4Address) -> ipaddress.IPv4Address:
        return self._to_host.get(guest, guest)


class PinTable:
    """Which names this VM's DNS proxy resolved to which addresses, until when. Bounded: the oldest
    entries go first, so a guest asking for endless names cannot grow it without limit."""

    def __init__(self, max_entries: int = MAX_PINS) -> None:
        self._entries: OrderedDict[tuple[ipaddress.IPv4Address, str], float] = OrderedDict()
        self._max = max_entries

    def add(self, name: str, address: ipaddress.IPv4Address, ttl: int, now: float | None = None) -> None:
        key = (address, name)
        self._entries.pop(key, None)
        moment = time.monotonic() if now is None else now
        self._entries[key] = moment + max(ttl, MIN_PIN_SECONDS)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def names_for(self, address: ipaddress.IPv4Address, now: float | None = None) -> frozenset[str]:
        moment = time.monotonic() if now is None else now
        return frozenset(n for (a, n), until in self._entries.items() if a == address and until > moment)

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(frozen=True)
class DnsEvent:
    name: str
    qtype: str
    action: str  # "allow", "deny", "servfail"
    rule: str
    answers: tuple[str, ...] = ()


Upstream = tuple[str, int]


class _Receiver(asyncio.DatagramProtocol):
    """Resolves ``future`` with the first datagram (the upstream's answer)."""

    def __init__(self, future: asyncio.Future[bytes]) -> None:
        self._future = future

    def datagram_received(self, data: bytes, addr: object) -> None:
        if not self._future.done():
            self._future.set_result(data)


class DnsProxy:
    def __init__(
        self,
        policy: NetworkPolicy,
        upstreams: Sequence[Upstream],
        pins: PinTable,
        *,
        allow_internal: bool = False,
        on_event: Callable[[DnsEvent], None] | None = None,
        timeout: float = UPSTREAM_TIMEOUT,
        loopback: LoopbackMap | None = None,
    ) -> None:
        self._loopback = loopback or LoopbackMap()
        self._policy = policy
        self._upstreams = list(upstreams)
        self._pins = pins
        self._allow_internal = allow_internal
        self._on_event = on_event or (lambda event: None)
        self._timeout = timeout

    async def handle(self, packet: bytes) -> bytes | None:
        """The reply to one query from the guest, or ``None`` to drop something that is not one."""
        if len(packet) > MAX_QUERY:
            return None
        try:
            query = DNSRecord.parse(packet)
        except Exception:  # dnslib raises assorted errors on garbage
            return None
        if query.header.qr or len(query.questions) != 1:
            return None
        question = query.questions[0]
        qtype = QTYPE.get(question.qtype, str(question.qtype))
        try:
            name = normalize_name(str(question.qname))
        except Exception:
            return self._reply(query, RCODE.NXDOMAIN)
        decision = self._policy.decide_name(name)
        if not decision.allowed:
            self._on_event(DnsEvent(name, qtype, "deny", decision.rule))
            return self._reply(query, RCODE.NXDOMAIN)
        if qtype == "AAAA":
            self._on_event(DnsEvent(name, qtype, "allow", decision.rule))
            return self._reply(query, RCODE.NOERROR)  # no IPv6 for the guest
        if qtype != "A":
            self._on_event(DnsEvent(name, qtype, "deny", "only A and AAAA questions are answered"))
            return self._reply(query, RCODE.REFUSED)
        upstream_reply = await self._ask_upstream(query)
        if upstream_reply is None:
            self._on_event(DnsEvent(name, qtype, "servfail", "no upstream answered"))
            return self._reply(query, RCODE.SERVFAIL)
        return self._filter(query, upstream_reply, name, decision.rule)

    def _filter(self, query: DNSRecord, answer: DNSRecord, name: str, rule: str) -> bytes:
        reply = query.reply()
        kept: list[str] = []
        for record in answer.rr:
            if record.rtype != QTYPE.A:
                continue  # CNAMEs are followed by the upstream; only addresses matter here
            address = ipaddress.IPv4Address(str(record.rdata))
            if is_internal(address) and not self._allow_internal:
                continue
            if address.is_loopback:
                stand_in = self._loopback.guest_address(address)
                if stand_in is None:
                    continue
                address = stand_in
                record.rdata = A(str(address))
            self._pins.add(name, address, int(record.ttl))
            kept.append(str(address))
            record.rname = query.questions[0].qname
            reply.add_answer(record)
        if not kept:
            reply.header.rcode = RCODE.NXDOMAIN
        self._on_event(DnsEvent(name, "A", "allow", rule, tuple(kept)))
        return bytes(reply.pack())

    def _reply(self, query: DNSRecord, rcode: int) -> bytes:
        reply = query.reply()
        reply.header.rcode = rcode
        return bytes(reply.pack())

    async def _ask_upstream(self, query: DNSRecord) -> DNSRecord | None:
        forwarded = DNSRecord(header=query.header, q=query.questions[0])
        forwarded.header.rd = 1
        payload = bytes(forwarded.pack())
        loop = asyncio.get_running_loop()
        for host, port in self._upstreams:
            waiter: asyncio.Future[bytes] = loop.create_future()
            transport, _ = await loop.create_datagram_endpoint(
                functools.partial(_Receiver, waiter), remote_addr=(host, port)
            )
            try:
                transport.sendto(payload)
                data = await asyncio.wait_for(waiter, self._timeout)
                answer = DNSRecord.parse(data)
                if answer.header.id == query.header.id:
                    return answer
            except (TimeoutError, OSError, Exception) as exc:  # dnslib parse errors included
                log.info("upstream DNS %s:%d failed: %r", host, port, exc)
            finally:
                transport.close()
        return None
