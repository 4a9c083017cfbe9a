"""The gateway's DNS proxy: policy on names, pinning of answers, no tunnelling.

Every question from the guest is judged by :meth:`NetworkPolicy.decide_name` first. Denied names get
NXDOMAIN from here and never reach an upstream resolver, so DNS cannot carry data past the policy.
Allowed ``A`` questions are forwarded; the addresses in the answer are recorded in the VM's
:class:`PinTable` (domain rules later match only those addresses) and addresses in internal ranges
are removed unless the gateway allows internal destinations. ``AAAA`` gets an empty answer (the guest
has no IPv6 route). Wire format: ``dnslib``; nothing from the guest is trusted.

Bounded per VM, whatever the guest sends: one UDP socket per upstream, shared by every question in
flight (each goes out under a random id; an answer counts only for its id and question, from that
upstream's address), and at most :data:`MAX_PENDING` questions waiting for upstream. Beyond that a
question gets SERVFAIL at once, and so does one for which no upstream socket can be opened.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dnslib import QTYPE, RCODE, RR, A, DNSHeader, DNSQuestion, DNSRecord

from capsa._tasks import TaskSet
from capsa.net.policy import NetworkPolicy, is_internal, normalize_name

log = logging.getLogger(__name__)

MAX_PINS = 4096
MAX_NAMES_PER_ADDRESS = 64  # each new flow weighs every name of its destination
MIN_PIN_SECONDS = 30  # a short TTL must not break a connection opened right after the answer
MAX_QUERY = 512
UPSTREAM_TIMEOUT = 2.0
MAX_PENDING = 64  # questions waiting for an upstream at once, per VM; more get SERVFAIL at once
ROTATE_SECONDS = 1.0  # a new upstream socket (a new random source port) this often, when asked


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
    entries go first, so a guest asking for endless names cannot grow it without limit. Indexed by
    address too: every new flow asks for its destination's names, so that must not cost a pass over
    the whole table."""

    def __init__(self, max_entries: int = MAX_PINS) -> None:
        self._entries: OrderedDict[tuple[ipaddress.IPv4Address, str], float] = OrderedDict()
        self._by_address: dict[ipaddress.IPv4Address, dict[str, float]] = {}
        self._max = max_entries

    def add(self, name: str, address: ipaddress.IPv4Address, ttl: int, now: float | None = None) -> None:
        key = (address, name)
        self._entries.pop(key, None)
        moment = time.monotonic() if now is None else now
        until = self._entries[key] = moment + max(ttl, MIN_PIN_SECONDS)
        names = self._by_address.setdefault(address, {})
        names.pop(name, None)
        names[name] = until  # the oldest first, here too
        if len(names) > MAX_NAMES_PER_ADDRESS:
            self._forget(address, next(iter(names)))
        while len(self._entries) > self._max:
            self._forget(*next(iter(self._entries)))

    def _forget(self, address: ipaddress.IPv4Address, name: str) -> None:
        del self._entries[(address, name)]
        names = self._by_address[address]
        del names[name]
        if not names:
            del self._by_address[address]

    def names_for(self, address: ipaddress.IPv4Address, now: float | None = None) -> frozenset[str]:
        moment = time.monotonic() if now is None else now
        names = self._by_address.get(address, {})
        return frozenset(name for name, until in names.items() if until > moment)

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


class _UpstreamSocket(asyncio.DatagramProtocol):
    """One connected UDP socket to one upstream resolver, shared by every question in flight (the
    kernel drops datagrams from other addresses). Each question goes out under a random id of its
    own; an answer is taken only for the id and the very question it was sent with."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.opened = time.monotonic()
        self._retired = False
        self._waiting: dict[int, tuple[DNSQuestion, asyncio.Future[DNSRecord | None]]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        for _, waiter in self._waiting.values():
            if not waiter.done():
                waiter.set_result(None)

    def error_received(self, exc: Exception) -> None:
        log.debug("upstream DNS socket: %r", exc)  # e.g. ICMP port unreachable; questions time out

    def datagram_received(self, data: bytes, addr: object) -> None:
        entry = self._waiting.get(int.from_bytes(data[:2], "big")) if len(data) >= 12 else None
        if entry is None:
            return
        question, waiter = entry
        try:
            answer = DNSRecord.parse(data)
        except Exception:  # dnslib raises assorted errors on garbage
            return
        if answer.header.qr and answer.questions == [question] and not waiter.done():
            waiter.set_result(answer)

    async def ask(self, question: DNSQuestion, timeout: float) -> DNSRecord | None:
        if self.transport is None or self.transport.is_closing():
            return None
        ident = secrets.randbelow(1 << 16)
        while ident in self._waiting:  # at most MAX_PENDING of 65536 are taken
            ident = secrets.randbelow(1 << 16)
        waiter: asyncio.Future[DNSRecord | None] = asyncio.get_running_loop().create_future()
        self._waiting[ident] = (question, waiter)
        try:
            self.transport.sendto(bytes(DNSRecord(DNSHeader(id=ident, rd=1), q=question).pack()))
            return await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            return None
        finally:
            del self._waiting[ident]
            if self._retired and not self._waiting:
                self.close()

    def usable(self) -> bool:
        return self.transport is not None and not self.transport.is_closing() and not self._retired

    def retire(self) -> None:
        """Take no more questions; close once those in flight are answered or timed out."""
        self._retired = True
        if not self._waiting:
            self.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


@dataclass(frozen=True)
class _Forward:
    """A question the policy allows, to be asked upstream."""

    query: DNSRecord
    name: str
    rule: str


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
        max_pending: int = MAX_PENDING,
        local: Callable[[str], ipaddress.IPv4Address | None] | None = None,
    ) -> None:
        self._local = local or (lambda name: None)  # names answered here before the policy
        self._loopback = loopback or LoopbackMap()
        self._policy = policy
        self._upstreams = list(upstreams)
        self._pins = pins
        self._allow_internal = allow_internal
        self._on_event = on_event or (lambda event: None)
        self._timeout = timeout
        self._max_pending = max(1, min(max_pending, 1 << 15))  # ids must stay easy to find
        self._pending = 0
        self._sockets: dict[Upstream, _UpstreamSocket] = {}
        self._retired: set[_UpstreamSocket] = set()  # draining their questions
        self._opening = asyncio.Lock()
        self._tasks = TaskSet(log)

    def submit(self, packet: bytes, respond: Callable[[bytes], None]) -> None:
        """Take one datagram from the guest; ``respond`` gets the reply, if there is one. Whatever
        can be answered here is answered at once; a question for upstream starts a task only while
        fewer than ``max_pending`` wait, else it gets SERVFAIL at once. So a flood costs the caller
        no task and the host at most ``max_pending`` tasks and one socket per upstream."""
        judged = self._judge(packet)
        if not isinstance(judged, _Forward):
            if judged is not None:
                respond(judged)
            return
        if not self._admit(judged):
            respond(self._reply(judged.query, RCODE.SERVFAIL))
            return
        self._tasks.spawn(self._answer_later(judged, respond), name="dns-question")

    async def handle(self, packet: bytes) -> bytes | None:
        """The reply to one query from the guest, or ``None`` to drop something that is not one
        (the same bound on questions in flight as :meth:`submit`)."""
        judged = self._judge(packet)
        if not isinstance(judged, _Forward):
            return judged
        if not self._admit(judged):
            return self._reply(judged.query, RCODE.SERVFAIL)
        try:
            return await self._resolve(judged)
        finally:
            self._pending -= 1

    @property
    def policy(self) -> NetworkPolicy:
        return self._policy

    def set_policy(self, policy: NetworkPolicy) -> None:
        """Judge names by ``policy`` from now on, also the questions already sent upstream: an
        answer that arrives after the change is given only if the new policy allows the name."""
        self._policy = policy

    def close(self) -> None:
        """Stop the questions in flight and close the upstream sockets."""
        self._tasks.cancel()
        for channel in (*self._sockets.values(), *self._retired):
            channel.close()
        self._sockets.clear()
        self._retired.clear()

    def _admit(self, question: _Forward) -> bool:
        if self._pending >= self._max_pending:
            reason = f"more than {self._max_pending} questions in flight"
            self._on_event(DnsEvent(question.name, "A", "servfail", reason))
            return False
        self._pending += 1
        return True

    async def _answer_later(self, question: _Forward, respond: Callable[[bytes], None]) -> None:
        try:
            reply = await self._resolve(question)
        finally:
            self._pending -= 1
        respond(reply)

    async def _resolve(self, question: _Forward) -> bytes:
        upstream_reply = await self._ask_upstream(question.query)
        verdict = self._policy.decide_name(question.name)  # the policy may have changed meanwhile
        if not verdict.allowed:
            self._on_event(DnsEvent(question.name, "A", "deny", verdict.rule))
            return self._reply(question.query, RCODE.NXDOMAIN)
        if upstream_reply is not None:
            try:
                return self._filter(question.query, upstream_reply, question.name, question.rule)
            except Exception as exc:  # an answer dnslib parsed but that makes no sense
                log.warning("unusable upstream DNS answer for %s: %r", question.name, exc)
        self._on_event(DnsEvent(question.name, "A", "servfail", "no upstream answered"))
        return self._reply(question.query, RCODE.SERVFAIL)

    def _judge(self, packet: bytes) -> bytes | _Forward | None:
        """The reply decided here, ``None`` to drop the datagram, or the question to ask upstream."""
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
        local = self._local(name)
        if local is not None:  # a cluster member: answered here, never asked upstream
            self._on_event(DnsEvent(name, qtype, "allow", "cluster member", (str(local),)))
            reply = query.reply()
            if qtype == "A":
                reply.add_answer(RR(question.qname, QTYPE.A, rdata=A(str(local)), ttl=5))
            return bytes(reply.pack())
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
        return _Forward(query, name, decision.rule)

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
        for upstream in self._upstreams:
            try:
                channel = await self._socket(upstream)
            except OSError as exc:  # out of file descriptors, no route, ...
                log.warning("no socket for upstream DNS %s:%d: %r", *upstream, exc)
                continue
            answer = await channel.ask(query.questions[0], self._timeout)
            if answer is not None:
                return answer
            log.info("upstream DNS %s:%d did not answer in %.1f s", *upstream, self._timeout)
        return None

    async def _socket(self, upstream: Upstream) -> _UpstreamSocket:
        """The socket to ask ``upstream`` on. A new one (on a new random port, so an off-path
        spoofer has the port to guess as well as the id) replaces it every :data:`ROTATE_SECONDS`;
        the old one closes once its questions are done, which takes at most the timeout. So per
        upstream at most ``2 + timeout / ROTATE_SECONDS`` sockets are open, whatever the load."""
        async with self._opening:
            current = self._sockets.get(upstream)
            age = time.monotonic() - current.opened if current is not None else ROTATE_SECONDS
            if current is not None and current.usable() and age < ROTATE_SECONDS:
                return current
            loop = asyncio.get_running_loop()
            try:
                _, fresh = await loop.create_datagram_endpoint(_UpstreamSocket, remote_addr=upstream)
            except OSError:
                if current is not None and current.usable():
                    return current  # keep asking on the old port rather than not at all
                raise
            self._retired = {c for c in self._retired if c.transport and not c.transport.is_closing()}
            if current is not None:
                current.retire()
                self._retired.add(current)
            self._sockets[upstream] = fresh
            return fresh
