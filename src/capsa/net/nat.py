"""The NAT of one guest: its TCP and UDP flows to host sockets, after the policy allowed each.

Flows are keyed by :class:`FlowKey` and send through a callback (``send(src, proto, payload,
bounded)``): they know nothing of links or switches. Bounded per guest: at most :data:`MAX_FLOWS`
TCP and UDP flows (plus, for TCP, as many as the diverter admits: the secrets proxy's intercepted
connections), a receive window per TCP flow. A denied TCP connect gets an RST at once, denied UDP
an ICMP unreachable: a denial never looks like a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import NamedTuple, Protocol, cast

from capsa._tasks import TaskSet
from capsa.net.dns import LoopbackMap, PinTable
from capsa.net.gateway import Gateway
from capsa.net.packets import (
    PROTO_ICMP,
    PROTO_TCP,
    PROTO_UDP,
    TCP_FIN,
    TCP_SYN,
    IPv4,
    Tcp,
    Udp,
    icmp_unreachable,
)
from capsa.net.policy import Flow, is_internal
from capsa.net.tcp import State, TcpEndpoint

log = logging.getLogger(__name__)

MAX_FLOWS = 512
CONNECT_TIMEOUT = 10.0
UDP_IDLE = 60.0
OUTBOUND_HIGH = 256 << 10  # host bytes queued for the guest before we stop reading the host socket

# send(src, proto, payload, bounded): one IP packet from ``src`` to the guest
Send = Callable[[ipaddress.IPv4Address, int, bytes, bool], None]
# One egress decision: (proto, dst, port, domain, rule, action)
Decision = tuple[str, ipaddress.IPv4Address, int | None, str | None, str, str]
Record = Callable[[Decision], None]


class Diverter(Protocol):
    """Where flows to some destinations go instead of a plain host socket (the secrets proxy)."""

    limit: int  # flows it takes at once (it refuses more): room the NAT keeps for them

    def wants(self, names: frozenset[str], port: int) -> bool: ...

    def open(
        self, host: str, port: int, dst: ipaddress.IPv4Address, names: frozenset[str]
    ) -> Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]: ...


class FlowKey(NamedTuple):
    """A flow as the guest sees it: its port, and the remote address and port."""

    guest_port: int
    remote_ip: ipaddress.IPv4Address
    remote_port: int


class TcpFlow:
    """One TCP connection between the guest and a host socket (NAT or port forward)."""

    def __init__(
        self, endpoint: TcpEndpoint, send: Send, tasks: TaskSet, on_close: Callable[[TcpFlow], None]
    ) -> None:
        self.ep = endpoint
        self.key = FlowKey(endpoint.guest_port, endpoint.remote_ip, endpoint.remote_port)
        self._send_ip = send
        self._tasks = tasks
        self._on_close = on_close
        self.writer: asyncio.StreamWriter | None = None
        self.inbound_ready = asyncio.Event()
        self.outbound_room = asyncio.Event()
        self.answered = asyncio.Event()  # the guest answered a forward's SYN (SYN-ACK or RST)
        self.tasks: list[asyncio.Task[None]] = []

    def send(self, segment: bytes, *, bounded: bool | None = None) -> None:
        """Data, SYN and FIN are never dropped (the windows bound them and nothing retransmits
        them); a bare ACK or RST may be, as the guest's own retransmission recovers from that."""
        if bounded is None:
            bounded = len(segment) == (segment[12] >> 4) * 4 and not segment[13] & (TCP_SYN | TCP_FIN)
        self._send_ip(self.ep.remote_ip, PROTO_TCP, segment, bounded)

    def start(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.tasks = [
            self._tasks.spawn(self._to_host(), name="tcp-to-host"),
            self._tasks.spawn(self._from_host(reader), name="tcp-from-host"),
        ]

    async def _to_host(self) -> None:
        assert self.writer is not None
        try:
            while True:
                chunk, update = self.ep.take_inbound(1 << 16)
                for segment in update:
                    self.send(segment)
                if chunk:
                    self.writer.write(chunk)
                    await self.writer.drain()
                    continue
                if self.ep.guest_fin:
                    with contextlib.suppress(OSError):
                        self.writer.write_eof()
                    return
                self.inbound_ready.clear()
                await self.inbound_ready.wait()
        except (ConnectionError, OSError):
            self.abort()

    async def _from_host(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                while len(self.ep.outbound) > OUTBOUND_HIGH:
                    self.outbound_room.clear()
                    await self.outbound_room.wait()
                data = await reader.read(1 << 16)
                segments = self.ep.send(data) if data else self.ep.close()
                for segment in segments:
                    self.send(segment)
                if not data:
                    return
        except (ConnectionError, OSError):
            self.abort()

    def on_guest_segment(self, tcp: Tcp) -> None:
        for segment in self.ep.on_segment(tcp):
            self.send(segment)
        if self.ep.state is not State.SYN_SENT:
            self.answered.set()
        self.inbound_ready.set()
        self.outbound_room.set()
        if self.ep.closed:
            self.close()

    def abort(self) -> None:
        if not self.ep.closed:
            self.send(self.ep.reset(), bounded=True)
        self.close()

    def close(self) -> None:
        self._on_close(self)
        for task in self.tasks:
            if task is not asyncio.current_task():
                task.cancel()
        if self.writer is not None:
            self.writer.close()


class UdpFlow(asyncio.DatagramProtocol):
    def __init__(self, key: FlowKey, guest_ip: ipaddress.IPv4Address, send: Send) -> None:
        self.key = key
        self.guest_ip = guest_ip
        self._send_ip = send
        self.transport: asyncio.DatagramTransport | None = None
        self.last = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's selector datagram transport does not subclass DatagramTransport on 3.11
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        guest_port, remote_ip, remote_port = self.key
        self.last = time.monotonic()
        segment = Udp.build(remote_ip, self.guest_ip, remote_port, guest_port, data[:65000])
        self._send_ip(remote_ip, PROTO_UDP, segment, True)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class Nat:
    """The egress of one guest: policy decisions, TCP and UDP flows to host sockets."""

    def __init__(
        self,
        gateway: Gateway,
        guest_ip: ipaddress.IPv4Address,
        *,
        pins: PinTable,
        loopback: LoopbackMap,
        send: Send,
        record: Record,
        tasks: TaskSet,
    ) -> None:
        self.gateway = gateway
        self.guest_ip = guest_ip
        self._pins = pins
        self._loopback = loopback
        self._send = send
        self._record = record
        self._tasks = tasks
        self.tcp: dict[FlowKey, TcpFlow] = {}
        self.udp: dict[FlowKey, UdpFlow] = {}
        self.diverter: Diverter | None = None

    def new_tcp_flow(self, endpoint: TcpEndpoint) -> TcpFlow:
        flow = TcpFlow(endpoint, self._send, self._tasks, self._forget)
        self.tcp[flow.key] = flow
        return flow

    def _forget(self, flow: TcpFlow) -> None:
        if self.tcp.get(flow.key) is flow:
            del self.tcp[flow.key]

    def refuse(self, ip: IPv4, tcp: Tcp) -> None:
        """An RST for a segment of no connection we hold (never for an RST)."""
        if not tcp.flags & 0x04:
            self._send(ip.dst, PROTO_TCP, TcpEndpoint.refuse(tcp, self.guest_ip, ip.dst), True)

    def close(self) -> None:
        for flow in list(self.tcp.values()):
            flow.close()
        for udp in list(self.udp.values()):
            udp.close()
        self.udp.clear()

    def revoke(self, gateway: Gateway) -> int:
        """Take ``gateway`` (a new policy) and end the live flows it denies: each such TCP flow
        gets an RST to the guest and its host socket closed, each such UDP flow is dropped (the
        guest's next datagram is a new flow, judged and refused). Judged by :meth:`decide`, as at
        the flow's creation (pinned names included), and logged. Port forwards (flows the host
        opened to the guest) are not egress and stay. Synchronous: no flow slips between the new
        policy and its enforcement. Returns how many flows were ended."""
        self.gateway = gateway
        ended = 0
        for key, flow in list(self.tcp.items()):
            if key.remote_ip == gateway.gateway_ip:
                continue  # a port forward
            allowed, rule, domain = self.decide("tcp", key.remote_ip, key.remote_port)
            if not allowed:
                self._record(("tcp", key.remote_ip, key.remote_port, domain, f"{rule} (reset)", "deny"))
                flow.abort()
                ended += 1
        for key, udp in list(self.udp.items()):
            allowed, rule, domain = self.decide("udp", key.remote_ip, key.remote_port)
            if not allowed:
                dropped = f"{rule} (dropped)"
                self._record(("udp", key.remote_ip, key.remote_port, domain, dropped, "deny"))
                udp.close()
                del self.udp[key]
                ended += 1
        return ended

    def decide(self, proto: str, dst: ipaddress.IPv4Address, port: int) -> tuple[bool, str, str | None]:
        """``dst`` as the guest sees it: pins are kept that way; IP rules see the real host address."""
        names = self._pins.names_for(dst)
        domain = min(names) if names else None
        real = self._loopback.host_address(dst)
        if is_internal(real) and not self.gateway.internal_allowed:
            return False, "internal destination", domain
        if real != dst and not names:
            return False, "stand-in address never resolved", domain
        decision = self.gateway.policy_value.decide(Flow(proto, real, port, names))  # type: ignore[arg-type]
        return decision.allowed, decision.rule, domain

    # -- TCP --

    def on_tcp(self, ip: IPv4, tcp: Tcp) -> None:
        flow = self.tcp.get(FlowKey(tcp.src_port, ip.dst, tcp.dst_port))
        if flow is not None:
            flow.on_guest_segment(tcp)
        elif ip.dst == self.gateway.gateway_ip:
            self.refuse(ip, tcp)  # nothing listens on the gateway
        else:
            self._tcp_out(ip, tcp)

    def _tcp_out(self, ip: IPv4, tcp: Tcp) -> None:
        if not tcp.flags & TCP_SYN or tcp.flags & 0x10:  # not a fresh SYN: nothing to continue
            self.refuse(ip, tcp)
            return
        allowed, rule, domain = self.decide("tcp", ip.dst, tcp.dst_port)
        self._record(("tcp", ip.dst, tcp.dst_port, domain, rule, "allow" if allowed else "deny"))
        if not allowed or len(self.tcp) >= self._tcp_room(ip.dst, tcp.dst_port):
            self.refuse(ip, tcp)
            return
        flow = self.new_tcp_flow(TcpEndpoint.accept(tcp, self.guest_ip, ip.dst, secrets.randbits(32)))
        self._tasks.spawn(self._connect(flow, tcp))

    def _tcp_room(self, dst: ipaddress.IPv4Address, port: int) -> int:
        """:data:`MAX_FLOWS`, and for a flow the diverter takes as many more as it admits (it
        enforces its own limit): intercepted connections do not crowd out the others' room."""
        diverter = self.diverter
        if diverter is not None and diverter.wants(self._pins.names_for(dst), port):
            return MAX_FLOWS + diverter.limit
        return MAX_FLOWS

    async def _connect(self, flow: TcpFlow, syn: Tcp) -> None:
        """The host side first: the guest hears nothing (its retransmitted SYNs are ignored) until
        the host connect succeeded, then our SYN-ACK; a failure or timeout gets an RST."""
        ep = flow.ep
        try:
            host = self._loopback.host_address(ep.remote_ip)
            names = self._pins.names_for(ep.remote_ip)
            diverter = self.diverter
            if diverter is not None and diverter.wants(names, ep.remote_port):
                opening = diverter.open(str(host), ep.remote_port, ep.remote_ip, names)
            else:
                opening = asyncio.open_connection(str(host), ep.remote_port)
            reader, writer = await asyncio.wait_for(opening, CONNECT_TIMEOUT)
        except (OSError, TimeoutError):
            if self.tcp.get(flow.key) is flow:
                del self.tcp[flow.key]
                refusal = TcpEndpoint.refuse(syn, self.guest_ip, ep.remote_ip)
                self._send(ep.remote_ip, PROTO_TCP, refusal, True)
            return
        if self.tcp.get(flow.key) is not flow or ep.state is not State.SYN_RECEIVED:
            writer.close()  # the guest gave up (RST) or the stack closed meanwhile
            return
        flow.start(reader, writer)
        flow.send(ep.syn_ack())

    # -- UDP --

    def on_udp(self, ip: IPv4, udp: Udp) -> None:
        key = FlowKey(udp.src_port, ip.dst, udp.dst_port)
        flow = self.udp.get(key)
        if flow is None:
            allowed, rule, domain = self.decide("udp", ip.dst, udp.dst_port)
            self._record(("udp", ip.dst, udp.dst_port, domain, rule, "allow" if allowed else "deny"))
            if not allowed or len(self.udp) >= MAX_FLOWS:
                quoted = Udp.build(self.guest_ip, ip.dst, udp.src_port, udp.dst_port, bytes(udp.payload))
                raw = IPv4.build(self.guest_ip, ip.dst, PROTO_UDP, quoted)
                self._send(self.gateway.gateway_ip, PROTO_ICMP, icmp_unreachable(raw), True)
                return
            flow = UdpFlow(key, self.guest_ip, self._send)
            self.udp[key] = flow
            self._tasks.spawn(self._open_udp(flow, bytes(udp.payload)))
            return
        if flow.transport is not None:
            flow.last = time.monotonic()
            flow.transport.sendto(bytes(udp.payload))

    async def _open_udp(self, flow: UdpFlow, first: bytes) -> None:
        loop = asyncio.get_running_loop()
        try:
            host = self._loopback.host_address(flow.key.remote_ip)
            transport, _ = await loop.create_datagram_endpoint(
                lambda: flow, remote_addr=(str(host), flow.key.remote_port)
            )
        except OSError:
            self.udp.pop(flow.key, None)
            return
        flow.transport = transport
        transport.sendto(first)

    def reap_udp(self, now: float) -> None:
        for key, flow in list(self.udp.items()):
            if now - flow.last > UDP_IDLE:
                flow.close()
                self.udp.pop(key, None)
