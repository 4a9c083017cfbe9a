"""``Gateway`` and ``VirtualNetwork``: the configuration of a VM's virtual network (immutable)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, replace
from pathlib import Path

from capsa.errors import ConfigError
from capsa.net.policy import NetworkPolicy

RESOLV_CONF = Path("/etc/resolv.conf")


def _network(subnet: str) -> ipaddress.IPv4Network:
    try:
        network = ipaddress.IPv4Network(subnet, strict=True)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"invalid subnet {subnet!r}: {exc}") from None
    if not 8 <= network.prefixlen <= 30:
        raise ConfigError(
            f"subnet {subnet} must have a prefix from /8 to /30 (room for gateway and guest)"
        )
    return network


def _upstream(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":") if text.count(":") == 1 else (text, "", "53")
    try:
        address = str(ipaddress.IPv4Address(host))
        number = int(port)
    except ValueError:
        raise ConfigError(f"DNS servers are 'IPv4[:port]', got {text!r}") from None
    if not 1 <= number <= 65535:
        raise ConfigError(f"invalid DNS server port in {text!r}")
    return address, number


@dataclass(frozen=True)
class Gateway:
    """The router of a virtual network: the gateway is the subnet's first address, the guest the
    second (handed out by DHCP, or configured at boot in sandboxes), DNS is the gateway itself."""

    subnet: str = "10.0.2.0/24"
    policy_value: NetworkPolicy = field(default_factory=NetworkPolicy.allow_all)
    dns: tuple[tuple[str, int], ...] = ()
    internal_allowed: bool = False

    def __post_init__(self) -> None:
        _network(self.subnet)

    @property
    def network(self) -> ipaddress.IPv4Network:
        return _network(self.subnet)

    @property
    def gateway_ip(self) -> ipaddress.IPv4Address:
        return self.network.network_address + 1

    @property
    def guest_ip(self) -> ipaddress.IPv4Address:
        return self.network.network_address + 2

    def policy(self, policy: NetworkPolicy) -> Gateway:
        if not isinstance(policy, NetworkPolicy):
            raise ConfigError("policy() takes a NetworkPolicy")
        return replace(self, policy_value=policy)

    def dns_servers(self, servers: list[str]) -> Gateway:
        """Upstream resolvers (``"IPv4[:port]"``); default: the host's /etc/resolv.conf."""
        if isinstance(servers, str) or not servers:
            raise ConfigError("dns_servers() takes a non-empty list such as ['127.0.0.1:5353']")
        return replace(self, dns=tuple(_upstream(s) for s in servers))

    def allow_internal_destinations(self) -> Gateway:
        """Let the guest reach loopback/private/link-local addresses (and DNS answers pointing there):
        for tests against servers on 127.0.0.1. Off by default."""
        return replace(self, internal_allowed=True)

    def upstreams(self) -> list[tuple[str, int]]:
        if self.dns:
            return list(self.dns)
        servers = []
        try:
            for line in RESOLV_CONF.read_text().splitlines():
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    with_port = parts[1]
                    try:
                        servers.append(_upstream(with_port))
                    except ConfigError:
                        continue  # IPv6 resolvers: the stack asks over IPv4 only
        except OSError:
            pass
        return servers


@dataclass(frozen=True)
class VirtualNetwork:
    """A NIC behind capsa's userspace NAT. ``VirtualNetwork()`` allows all egress;
    ``VirtualNetwork.with_gateway(Gateway(...).policy(...))`` restricts it."""

    gateway: Gateway = field(default_factory=Gateway)

    @classmethod
    def with_gateway(cls, gateway: Gateway) -> VirtualNetwork:
        if not isinstance(gateway, Gateway):
            raise ConfigError("with_gateway() takes a Gateway")
        return cls(gateway)
