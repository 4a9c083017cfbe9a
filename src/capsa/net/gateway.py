"""``Gateway`` and ``VirtualNetwork``: the configuration of a VM's virtual network (immutable)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from capsa.errors import ConfigError
from capsa.net.policy import NetworkPolicy

if TYPE_CHECKING:
    from capsa.net.secrets import Secret, SecretSession

RESOLV_CONF = Path("/etc/resolv.conf")
INTERCEPTED = 1024  # connections through the secrets proxy at once, per sandbox (by default)
MAX_INTERCEPTED = 65536


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


def _port(value: object, what: str, *, zero_ok: bool = False) -> int:
    low = 0 if zero_ok else 1
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 65535:
        raise ConfigError(f"{what} must be a port number {low}..65535, got {value!r}")
    return value


@dataclass(frozen=True)
class PortForward:
    """``host_address:host_port`` on the host reaches ``guest_port`` in the guest. A host port of 0
    takes any free port; ``vm.network.forwards()`` tells which one."""

    proto: Literal["tcp", "udp"]
    host_port: int
    guest_port: int
    host_address: str = "127.0.0.1"

    def overlaps(self, other: PortForward) -> bool:
        if self.proto != other.proto or self.host_port == 0 or self.host_port != other.host_port:
            return False
        wildcard = "0.0.0.0"
        return wildcard in (self.host_address, other.host_address) or (
            self.host_address == other.host_address
        )


@dataclass(frozen=True)
class Gateway:
    """The router of a virtual network: the gateway is the subnet's first address, the guest the
    second (handed out by DHCP, or configured at boot in sandboxes), DNS is the gateway itself."""

    subnet: str = "10.0.2.0/24"
    policy_value: NetworkPolicy = field(default_factory=NetworkPolicy.allow_all)
    dns: tuple[tuple[str, int], ...] = ()
    internal_allowed: bool = False
    forwards: tuple[PortForward, ...] = ()
    secrets: tuple[Secret, ...] = ()
    upstream_cas: tuple[Path, ...] = ()
    intercept_limit: int = INTERCEPTED
    # A fork's gateway carries its parent's placeholders and CA (see docs/secrets.md).
    shared_session: SecretSession | None = field(default=None, compare=False, repr=False)

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
        """Let the guest reach loopback/private/link-local addresses and the host's own interface
        addresses (and DNS answers pointing there): for tests against servers on 127.0.0.1. Off by
        default."""
        return replace(self, internal_allowed=True)

    def forward_tcp(
        self, host_port: int, guest_port: int, *, host_address: str = "127.0.0.1"
    ) -> Gateway:
        """Connections to ``host_address:host_port`` on the host reach the guest's ``guest_port``
        (they come from the gateway's address). Host port 0 picks a free port."""
        return self._forward("tcp", host_port, guest_port, host_address)

    def forward_udp(
        self, host_port: int, guest_port: int, *, host_address: str = "127.0.0.1"
    ) -> Gateway:
        """Datagrams to ``host_address:host_port`` reach the guest's ``guest_port``; its replies go
        back to the sender."""
        return self._forward("udp", host_port, guest_port, host_address)

    def _forward(
        self, proto: Literal["tcp", "udp"], host_port: int, guest_port: int, host_address: str
    ) -> Gateway:
        try:
            address = str(ipaddress.IPv4Address(host_address))
        except ValueError:
            raise ConfigError(f"host_address must be an IPv4 address, got {host_address!r}") from None
        forward = PortForward(
            proto,
            _port(host_port, "host_port", zero_ok=True),
            _port(guest_port, "guest_port"),
            address,
        )
        for existing in self.forwards:
            if forward.overlaps(existing):
                raise ConfigError(
                    f"{proto} host port {address}:{host_port} is already forwarded "
                    f"(to guest port {existing.guest_port})",
                    hint="each host port can be forwarded once; use another host port",
                )
        return replace(self, forwards=(*self.forwards, forward))

    def secret(
        self,
        name: str,
        value: str,
        *,
        hosts: list[str],
        allow_http: bool = False,
        prefix: str | None = None,
        header: str | None = None,
    ) -> Gateway:
        """Give sandboxes ``name=<placeholder>`` in their environment; the gateway swaps the
        placeholder for ``value`` in HTTPS requests to ``hosts`` (``"api.example.com"``,
        ``"*.example.com"``, ``"host:8443"``) and nowhere else. ``allow_http``: also over plain HTTP
        (unauthenticated: not advised). ``prefix``: the placeholder's (default: the value's, if it
        starts with a well-known key prefix such as ``sk-``). ``header``: instead of a placeholder,
        the gateway sets this request header to ``value`` on every request to ``hosts`` (replacing
        the guest's; ``name`` then only labels the log). See docs/secrets.md."""
        from capsa.net.secrets import make_secret  # noqa: PLC0415 - cryptography only when used

        secret = make_secret(name, value, hosts, allow_http=allow_http, prefix=prefix, header=header)
        if any(s.name == secret.name for s in self.secrets):
            raise ConfigError(f"secret {name} is already configured on this gateway")
        return replace(self, secrets=(*self.secrets, secret), shared_session=None)

    def upstream_ca(self, path: str | Path) -> Gateway:
        """Also trust the CA certificates in ``path`` (PEM) when the secrets proxy verifies an
        upstream server (besides the system's trust store): private CAs, tests."""
        resolved = Path(path).expanduser()
        if not resolved.is_file():
            raise ConfigError(f"upstream CA file not found: {resolved}")
        return replace(self, upstream_cas=(*self.upstream_cas, resolved))

    def intercepted_connections(self, limit: int) -> Gateway:
        """At most ``limit`` connections through the secrets proxy at once (default 1024); past it
        a new one is refused (the guest sees a reset) and logged. Each holds three of the host
        process's file descriptors (capsa raises its soft ``ulimit -n`` as far as the hard one)."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_INTERCEPTED:
            raise ConfigError(f"intercepted_connections takes 1..{MAX_INTERCEPTED}, got {limit!r:.40}")
        return replace(self, intercept_limit=limit)

    def sharing(self, session: SecretSession | None) -> Gateway:
        """This gateway, its sandbox using ``session`` (a fork's: its parent's placeholders and CA)."""
        return replace(self, shared_session=session)

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
