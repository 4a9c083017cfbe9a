"""One guest's network: its link (:mod:`capsa.net.link`), a port on a switch
(:mod:`capsa.net.switch`), and the gateway's services for it: ARP, DHCP, ping, DNS
(:mod:`capsa.net.dns`), the NAT (:mod:`capsa.net.nat`) and port forwards
(:mod:`capsa.net.forward`). A standalone VM is a cluster of one: its stack has a switch of its own.

Bounded per VM: the NAT's flows, an egress log of :data:`MAX_LOG` entries, and the frames queued on
a link whose guest does not read (see :class:`~capsa.net.link.Link`).
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import ipaddress
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from capsa._tasks import TaskSet
from capsa.errors import CapsaError, ConfigError
from capsa.net.dhcp import DhcpRequest, DhcpServer
from capsa.net.dns import DnsEvent, DnsProxy, LoopbackMap, PinTable
from capsa.net.forward import ForwardedPort, Forwarder
from capsa.net.gateway import Gateway, PortForward
from capsa.net.link import MAX_FRAME, Link
from capsa.net.nat import MAX_FLOWS, UDP_IDLE, Decision, Nat
from capsa.net.packets import (
    BROADCAST_MAC,
    ETH_ARP,
    ETH_IPV4,
    PROTO_ICMP,
    PROTO_TCP,
    PROTO_UDP,
    Arp,
    Ethernet,
    IcmpEcho,
    IPv4,
    Tcp,
    Udp,
)
from capsa.net.policy import NetworkPolicy
from capsa.net.switch import Switch

if TYPE_CHECKING:
    from capsa.net.secrets import Secret, SecretSession

log = logging.getLogger(__name__)

__all__ = ["GATEWAY_MAC", "MAX_FLOWS", "MAX_FRAME", "MAX_LOG", "LogEntry", "NetworkStack", "open_stack"]

MAX_LOG = 10_000
GATEWAY_MAC = bytes.fromhex("525400000002")

# Set by a cluster while it builds a member: the VM's stack then joins the cluster's switch.
ATTACH: contextvars.ContextVar[Callable[[Gateway, ipaddress.IPv4Address | None], NetworkStack] | None]
ATTACH = contextvars.ContextVar("capsa_net_attach", default=None)


def open_stack(gateway: Gateway, guest_ip: ipaddress.IPv4Address | None = None) -> NetworkStack:
    """The stack for a VM being started: a port on a cluster's switch while a cluster builds it,
    else a network of its own."""
    attach = ATTACH.get()
    if attach is not None:
        return attach(gateway, guest_ip)
    return NetworkStack(gateway, guest_ip=guest_ip)


def _secret_session(gateway: Gateway) -> SecretSession:
    """The gateway's secrets for one sandbox: a fork's parent's session, else a new one (checked
    against the policy first: a secret bound to a host the policy denies is a ConfigError)."""
    from capsa.net.secrets import SecretSession, check_secrets  # noqa: PLC0415

    check_secrets(gateway.secrets, gateway.policy_value)
    if gateway.shared_session is not None:
        return gateway.shared_session
    return SecretSession(gateway.secrets)


@dataclass(frozen=True)
class LogEntry:
    time: float
    proto: str
    dst_ip: str
    dst_port: int | None
    domain: str | None
    rule: str
    action: str  # "allow" or "deny"
    member: str | None = None  # the cluster member that decided it (None: a standalone VM)


class NetworkStack:
    """One VM's network. ``start(path)`` listens on the unix socket QEMU will connect to."""

    def __init__(
        self,
        gateway: Gateway,
        hostname: str = "capsa",
        guest_ip: ipaddress.IPv4Address | None = None,
        *,
        switch: Switch | None = None,
        name: str | None = None,
        mac: bytes | None = None,
    ) -> None:
        self.gateway = gateway
        self.name = name
        self.guest_ip = gateway.guest_ip if guest_ip is None else guest_ip
        # A standalone guest's MAC is learnt from its frames; a cluster member's is fixed by name.
        self._learn_mac = mac is None
        self.guest_mac = mac or bytes.fromhex("525400") + secrets.token_bytes(3)
        self.switch = switch if switch is not None else Switch(gateway)
        self.link = Link(self._on_frame)
        self._pins = PinTable()
        self._loopback = LoopbackMap()
        self._log: collections.deque[LogEntry] = collections.deque(maxlen=MAX_LOG)
        self._tasks = TaskSet(log)  # background work: failures are logged, never lost
        self._dns = DnsProxy(
            gateway.policy_value, gateway.upstreams(), self._pins,
            allow_internal=gateway.internal_allowed, on_event=self._dns_event, loopback=self._loopback,
            local=self.switch.resolve,
        )  # fmt: skip
        self._dhcp = DhcpServer(gateway.gateway_ip, self.guest_ip, gateway.network, hostname=hostname)
        self.nat = Nat(gateway, self.guest_ip, pins=self._pins, loopback=self._loopback,
                       send=self.send_ip, record=self.record, tasks=self._tasks)  # fmt: skip
        self._forwards = Forwarder(self.nat, self.send_ip, self.record, lambda: self.link.connected)
        self.secret_session: SecretSession | None = None
        if gateway.secrets:
            from capsa.net.intercept import Interceptor  # noqa: PLC0415 - cryptography when used

            self.secret_session = _secret_session(gateway)
            self.nat.diverter = Interceptor(
                self.secret_session, gateway.upstream_cas, self.record, self._tasks,
                limit=gateway.intercept_limit,
            )  # fmt: skip
        self._ident = 0
        self._closed = False
        self.switch.attach(self)

    # -- public --

    def log(self) -> list[LogEntry]:
        """Every allow/deny decision so far (the newest :data:`MAX_LOG`)."""
        return list(self._log)

    @property
    def fixed_mac(self) -> bool:
        """Whether the guest's MAC was given (a cluster member's): frames from another are spoofed."""
        return not self._learn_mac

    def identity(self) -> dict[str, str]:
        """The guest's link identity for a restored guest's agent to take on (MAC, address, route):
        the snapshot carries the identity of the VM it was taken from."""
        mac = ":".join(f"{b:02x}" for b in self.guest_mac)
        address = f"{self.guest_ip}/{self.gateway.network.prefixlen}"
        return {"mac": mac, "address": address, "gateway": str(self.gateway.gateway_ip)}

    @property
    def policy(self) -> NetworkPolicy:
        """The egress policy in force (the gateway's, or the last :meth:`set_policy`'s)."""
        return self.gateway.policy_value

    def set_policy(self, policy: NetworkPolicy) -> None:
        """Replace the egress policy, atomically: from this call's return every new connection,
        datagram and DNS question is judged by ``policy`` (names it denies get NXDOMAIN, also for
        questions already sent upstream), and live flows to destinations it denies are ended (TCP:
        an RST to the guest and the host socket closed; UDP: dropped), each logged. One
        synchronous step on the stack's event loop: no packet is judged by a mix of the two."""
        if not isinstance(policy, NetworkPolicy):
            raise ConfigError(f"set_policy() takes a NetworkPolicy, got {type(policy).__name__}")
        if self._closed:
            raise CapsaError("this VM's network is closed", hint="set the policy of a running VM")
        self.gateway = replace(self.gateway, policy_value=policy)
        self._dns.set_policy(policy)
        ended = self.nat.revoke(self.gateway)
        log.info("network policy replaced; %d live flows it denies were ended", ended)

    def set_header_secrets(self, secrets: tuple[Secret, ...]) -> None:
        """Replace the sandbox's header secrets (``Gateway.secret(header=...)``) live: from this
        call's return each intercepted request gets the new headers (its placeholder secrets stay).
        ``ConfigError`` if the gateway had no secrets (no proxy, and no CA in the guest), if a
        host is not one the sandbox's CA was made for (its secrets' hosts at build), or if the
        policy denies one."""
        from capsa.net.secrets import check_secrets  # noqa: PLC0415

        session = self.secret_session
        if session is None:
            raise ConfigError(
                "this VM's gateway has no secrets: there is no proxy to set headers in",
                hint="give the gateway a secret for the host when the VM is built",
            )
        check_secrets(tuple(secrets), self.gateway.policy_value)
        session.set_headers(tuple(secrets))
        self.gateway = replace(self.gateway, secrets=session.secrets)
        log.info("header secrets replaced: %s", ", ".join(s.name for s in secrets) or "none")

    def forwards(self) -> list[ForwardedPort]:
        """The port forwards as bound on the host (with the real port where 0 was asked for)."""
        return list(self._forwards.bound)

    async def add_forward(self, forward: PortForward) -> ForwardedPort:
        """Bind one more port forward to this guest (``ConfigError`` if the host port is taken)."""
        return await self._forwards.listen(forward)

    async def start(self, path: Path) -> None:
        """Bind the port forwards (``ConfigError`` if a host port is taken), then listen for QEMU."""
        try:
            for forward in self.gateway.forwards:
                await self._forwards.listen(forward)
        except BaseException:
            await self.close()
            raise
        await self.link.start(path)
        self._tasks.spawn(self._reap(), name="net-reap")

    async def close(self) -> None:
        self._closed = True
        self.switch.detach(self)
        self._forwards.close()
        self.nat.close()
        self._tasks.cancel()
        self._dns.close()
        self.link.close()
        await asyncio.sleep(0)  # datagram transports release their sockets on the next loop turn

    @property
    def closed(self) -> bool:
        return self._closed

    # -- frames --

    def send_frame(
        self, dst_mac: bytes, ethertype: int, payload: bytes, *, bounded: bool = True
    ) -> None:
        self.link.send(Ethernet.build(dst_mac, GATEWAY_MAC, ethertype, payload), bounded=bounded)

    def send_ip(
        self, src: ipaddress.IPv4Address, proto: int, payload: bytes, bounded: bool = True
    ) -> None:
        """One IP packet from ``src`` (the gateway or a remote the NAT stands in for) to the guest."""
        self._ident = (self._ident + 1) & 0xFFFF
        packet = IPv4.build(src, self.guest_ip, proto, payload, ident=self._ident)
        self.send_frame(self.guest_mac, ETH_IPV4, packet, bounded=bounded)

    def _on_frame(self, frame: memoryview) -> None:
        self.switch.on_frame(self, frame)

    def on_gateway_frame(self, eth: Ethernet) -> None:
        """A frame for the gateway (or broadcast): the switch decided it is the gateway's."""
        if eth.ethertype == ETH_ARP:
            self._on_arp(Arp.parse(eth.payload))
        elif eth.ethertype == ETH_IPV4:
            self._learn(eth.src)
            self._on_ip(IPv4.parse(eth.payload))

    def _learn(self, mac: bytes) -> None:
        if self._learn_mac:
            self.guest_mac = mac

    def _on_arp(self, arp: Arp) -> None:
        if arp.op != 1 or arp.target_ip == arp.sender_ip or arp.target_ip not in self.gateway.network:
            return
        if arp.target_ip == self.guest_ip or self.switch.is_member(arp.target_ip):
            return  # members answer for themselves
        self._learn(arp.sender_mac)
        reply = Arp(2, GATEWAY_MAC, arp.target_ip, arp.sender_mac, arp.sender_ip)
        self.send_frame(arp.sender_mac, ETH_ARP, reply.build())

    def _on_ip(self, ip: IPv4) -> None:
        gateway = self.gateway.gateway_ip
        if ip.proto == PROTO_UDP:
            udp = Udp.parse(ip)
            if udp.dst_port == 67:
                self._on_dhcp(udp)
            elif ip.dst == gateway and udp.dst_port == 53:
                self._on_dns(udp)
            elif ip.dst == gateway:
                self._forwards.to_udp_forward(udp)
            else:
                self.nat.on_udp(ip, udp)
        elif ip.proto == PROTO_TCP:
            self.nat.on_tcp(ip, Tcp.parse(ip))
        elif ip.proto == PROTO_ICMP and ip.dst == gateway:
            echo = IcmpEcho.parse(ip)
            if echo.kind == 8:
                reply = IcmpEcho.build(0, echo.ident, echo.seq, bytes(echo.payload))
                self.send_ip(gateway, PROTO_ICMP, reply)

    # -- gateway services --

    def _on_dhcp(self, udp: Udp) -> None:
        request = DhcpRequest.parse(udp.payload)
        answer = self._dhcp.answer(request)
        if answer is None:
            return
        self._learn(request.client_mac)
        everyone = ipaddress.IPv4Address("255.255.255.255")
        segment = Udp.build(self.gateway.gateway_ip, everyone, 67, 68, answer)
        packet = IPv4.build(self.gateway.gateway_ip, everyone, PROTO_UDP, segment)
        self.send_frame(BROADCAST_MAC, ETH_IPV4, packet)

    def _on_dns(self, udp: Udp) -> None:
        gateway, port = self.gateway.gateway_ip, udp.src_port

        def respond(reply: bytes) -> None:  # bounded by the link like every frame but TCP data
            self.send_ip(gateway, PROTO_UDP, Udp.build(gateway, self.guest_ip, 53, port, reply))

        self._dns.submit(bytes(udp.payload), respond)  # bounded by the proxy: no task per query

    def _dns_event(self, event: DnsEvent) -> None:
        self.record(("dns", self.gateway.gateway_ip, 53, event.name, event.rule, event.action))

    def record(self, entry: Decision) -> None:
        """Add one allow/deny decision to this member's egress log."""
        proto, dst, port, domain, rule, action = entry
        self._log.append(LogEntry(time.time(), proto, str(dst), port, domain, rule, action, self.name))

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(UDP_IDLE / 4)
            now = time.monotonic()
            self.nat.reap_udp(now)
            self._forwards.reap(now)
