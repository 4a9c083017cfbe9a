"""Egress policy: which destinations a guest may reach, decided on the host.

A policy is an ordered list of rules plus a default (``allow_all()`` or ``deny_all()``). Each flow the
guest opens (and each DNS name it asks for) is checked against the rules in order; the first ALLOW or
DENY rule that matches decides, LOG rules only record and go on. Domain rules never trust the guest:
a flow matches ``Domain("api.github.com")`` only if its destination IP is one that *this VM's* DNS proxy
resolved for a matching name (``Flow.names``, filled from the VM's pin table), so editing /etc/hosts or
connecting to a literal IP gains nothing.

This module is pure logic (no sockets): the network stack builds :class:`Flow` objects and asks.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass, field, replace
from typing import Literal

from capsa.errors import ConfigError

Protocol = Literal["tcp", "udp", "icmp", "dns"]
PROTOCOLS = ("tcp", "udp", "icmp", "dns")
MAX_NAME = 253
_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")


class Action(enum.Enum):
    ALLOW = "allow"
    DENY = "deny"
    LOG = "log"  # non-terminal: record the match, keep evaluating


def normalize_name(name: str) -> str:
    """Lowercase, without the trailing dot; raises ConfigError for what is not a DNS name."""
    if not isinstance(name, str):
        raise ConfigError(f"a domain must be a string, got {name!r}")
    text = name.strip().lower().removesuffix(".")
    if not text or len(text) > MAX_NAME:
        raise ConfigError(f"invalid domain {name!r} (empty or longer than {MAX_NAME} characters)")
    for label in text.split("."):
        if not _LABEL.match(label):
            raise ConfigError(f"invalid domain {name!r}: bad label {label!r}")
    return text


@dataclass(frozen=True)
class Flow:
    """One decision's input. ``names`` are the names this VM's DNS proxy resolved to ``dst_ip``
    (for a DNS query: the name asked for, and no IP)."""

    proto: Protocol
    dst_ip: ipaddress.IPv4Address | None = None
    dst_port: int | None = None
    names: frozenset[str] = frozenset()


class Matcher:
    """Base of the composable matchers."""

    def matches(self, flow: Flow) -> bool:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class Domain(Matcher):
    """``"api.github.com"``: that name exactly (case-insensitive). ``"*.rust-lang.org"``: any name
    below it, but not ``rust-lang.org`` itself."""

    pattern: str
    _suffix: str = field(init=False, repr=False, compare=False)
    _wildcard: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        raw = self.pattern
        wildcard = isinstance(raw, str) and raw.startswith("*.")
        body = raw[2:] if wildcard else raw
        if isinstance(body, str) and "*" in body:
            raise ConfigError(f"invalid domain pattern {raw!r}: '*' is only allowed as '*.suffix'")
        name = normalize_name(body)
        if wildcard and "." not in name:
            raise ConfigError(f"domain pattern {raw!r} is too broad (a whole top-level domain)")
        object.__setattr__(self, "_suffix", name)
        object.__setattr__(self, "_wildcard", wildcard)

    def matches_name(self, name: str) -> bool:
        if self._wildcard:
            return name.endswith("." + self._suffix)
        return name == self._suffix

    def matches(self, flow: Flow) -> bool:
        return any(self.matches_name(name) for name in flow.names)

    def describe(self) -> str:
        return f"domain {self.pattern}"


@dataclass(frozen=True)
class Cidr(Matcher):
    network: str
    _net: ipaddress.IPv4Network = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            net = ipaddress.IPv4Network(self.network, strict=False)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"invalid IPv4 address or network {self.network!r}: {exc}") from None
        object.__setattr__(self, "_net", net)

    def matches(self, flow: Flow) -> bool:
        return flow.dst_ip is not None and flow.dst_ip in self._net

    def describe(self) -> str:
        return f"cidr {self._net}"


def Ip(address: str) -> Cidr:
    """One IPv4 address."""
    try:
        return Cidr(str(ipaddress.IPv4Address(address)) + "/32")
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"invalid IPv4 address {address!r}: {exc}") from None


@dataclass(frozen=True)
class Port(Matcher):
    """A destination port, or an inclusive range ``Port(8000, 8100)``."""

    low: int
    high: int | None = None

    def __post_init__(self) -> None:
        high = self.low if self.high is None else self.high
        for value in (self.low, high):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
                raise ConfigError(f"ports are integers from 1 to 65535, got {value!r}")
        if high < self.low:
            raise ConfigError(f"empty port range {self.low}-{high}")

    def matches(self, flow: Flow) -> bool:
        high = self.low if self.high is None else self.high
        return flow.dst_port is not None and self.low <= flow.dst_port <= high

    def describe(self) -> str:
        return f"port {self.low}" + (f"-{self.high}" if self.high not in (None, self.low) else "")


@dataclass(frozen=True)
class Proto(Matcher):
    name: str

    def __post_init__(self) -> None:
        if self.name not in PROTOCOLS:
            raise ConfigError(f"protocol must be one of {PROTOCOLS}, got {self.name!r}")

    def matches(self, flow: Flow) -> bool:
        return flow.proto == self.name

    def describe(self) -> str:
        return f"protocol {self.name}"


@dataclass(frozen=True)
class All(Matcher):
    """Matches when every part matches: ``All(Domain("x.org"), Port(443))``."""

    parts: tuple[Matcher, ...]

    def __init__(self, *parts: Matcher) -> None:
        if not parts or not all(isinstance(p, Matcher) for p in parts):
            raise ConfigError("All() takes one or more matchers")
        object.__setattr__(self, "parts", parts)

    def matches(self, flow: Flow) -> bool:
        return all(p.matches(flow) for p in self.parts)

    def describe(self) -> str:
        return " and ".join(p.describe() for p in self.parts)


@dataclass(frozen=True)
class AnyOf(Matcher):
    """Matches when one of the parts matches."""

    parts: tuple[Matcher, ...]

    def __init__(self, *parts: Matcher) -> None:
        if not parts or not all(isinstance(p, Matcher) for p in parts):
            raise ConfigError("AnyOf() takes one or more matchers")
        object.__setattr__(self, "parts", parts)

    def matches(self, flow: Flow) -> bool:
        return any(p.matches(flow) for p in self.parts)

    def describe(self) -> str:
        return " or ".join(p.describe() for p in self.parts)


@dataclass(frozen=True)
class Rule:
    action: Action
    matcher: Matcher

    def describe(self) -> str:
        return f"{self.action.value} {self.matcher.describe()}"


@dataclass(frozen=True)
class Decision:
    allowed: bool
    rule: str  # the deciding rule, or "default allow" / "default deny"
    logged: tuple[str, ...] = ()  # LOG rules that matched on the way


@dataclass(frozen=True)
class NetworkPolicy:
    """Immutable; every method returns a new policy. Start from ``allow_all()`` or ``deny_all()``."""

    default: Action = Action.DENY
    rules: tuple[Rule, ...] = ()

    @classmethod
    def allow_all(cls) -> NetworkPolicy:
        return cls(Action.ALLOW)

    @classmethod
    def deny_all(cls) -> NetworkPolicy:
        return cls(Action.DENY)

    def rule(self, action: Action, matcher: Matcher) -> NetworkPolicy:
        if not isinstance(action, Action) or not isinstance(matcher, Matcher):
            raise ConfigError("rule() takes an Action and a matcher (Domain, Ip, Cidr, Port, All, ...)")
        return replace(self, rules=(*self.rules, Rule(action, matcher)))

    def allow_domain(self, pattern: str) -> NetworkPolicy:
        return self.rule(Action.ALLOW, Domain(pattern))

    def deny_domain(self, pattern: str) -> NetworkPolicy:
        return self.rule(Action.DENY, Domain(pattern))

    def log_domain(self, pattern: str) -> NetworkPolicy:
        return self.rule(Action.LOG, Domain(pattern))

    def allow_ip(self, address: str) -> NetworkPolicy:
        return self.rule(Action.ALLOW, Ip(address))

    def deny_ip(self, address: str) -> NetworkPolicy:
        return self.rule(Action.DENY, Ip(address))

    def allow_cidr(self, network: str) -> NetworkPolicy:
        return self.rule(Action.ALLOW, Cidr(network))

    def deny_cidr(self, network: str) -> NetworkPolicy:
        return self.rule(Action.DENY, Cidr(network))

    def allow_port(self, low: int, high: int | None = None) -> NetworkPolicy:
        return self.rule(Action.ALLOW, Port(low, high))

    def deny_port(self, low: int, high: int | None = None) -> NetworkPolicy:
        return self.rule(Action.DENY, Port(low, high))

    def allow_protocol(self, name: str) -> NetworkPolicy:
        return self.rule(Action.ALLOW, Proto(name))

    def decide(self, flow: Flow) -> Decision:
        logged: list[str] = []
        for rule in self.rules:
            if not rule.matcher.matches(flow):
                continue
            if rule.action is Action.LOG:
                logged.append(rule.describe())
                continue
            return Decision(rule.action is Action.ALLOW, rule.describe(), tuple(logged))
        return Decision(self.default is Action.ALLOW, f"default {self.default.value}", tuple(logged))

    def decide_name(self, name: str) -> Decision:
        """May the guest resolve ``name``? Denied names get NXDOMAIN locally and are never sent
        upstream, so DNS cannot be used as a tunnel past the policy. In rule order: a DENY rule naming
        the domain refuses it; an ALLOW rule naming it, or allowing any address (a port or protocol
        rule, which lets data out anyway), permits it; IP and CIDR rules never make names resolvable.
        """
        flow = Flow("dns", names=frozenset({normalize_name(name)}))
        logged: list[str] = []
        for rule in self.rules:
            if rule.action is Action.LOG:
                if _names_domain(rule.matcher, flow):
                    logged.append(rule.describe())
                continue
            if _names_domain(rule.matcher, flow):
                return Decision(rule.action is Action.ALLOW, rule.describe(), tuple(logged))
            if rule.action is Action.ALLOW and _any_address(rule.matcher):
                return Decision(True, rule.describe(), tuple(logged))
        return Decision(self.default is Action.ALLOW, f"default {self.default.value}", tuple(logged))


def _names_domain(matcher: Matcher, flow: Flow) -> bool:
    """Does the matcher constrain the name, and accept this one?"""
    if isinstance(matcher, Domain):
        return matcher.matches(flow)
    if isinstance(matcher, All):
        domains = [p for p in matcher.parts if isinstance(p, Domain)]
        return bool(domains) and all(d.matches(flow) for d in domains)
    if isinstance(matcher, AnyOf):
        return any(_names_domain(p, flow) for p in matcher.parts)
    return False


def _any_address(matcher: Matcher) -> bool:
    """Does the matcher accept flows to any destination address (ports/protocols only)?"""
    if isinstance(matcher, (Port, Proto)):
        return True
    if isinstance(matcher, All):
        return all(_any_address(p) for p in matcher.parts)
    if isinstance(matcher, AnyOf):
        return any(_any_address(p) for p in matcher.parts)
    return False


_INTERNAL = [
    ipaddress.IPv4Network(n)
    for n in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",  # carrier-grade NAT
        "127.0.0.0/8",
        "169.254.0.0/16",  # link-local, including the 169.254.169.254 metadata service
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "224.0.0.0/4",
        "240.0.0.0/4",
    )
]


def is_internal(address: ipaddress.IPv4Address) -> bool:
    """Loopback, private, link-local/metadata, CGNAT, multicast or reserved: refused as destinations
    (and in DNS answers) unless the gateway opts in with ``allow_internal_destinations()``."""
    return any(address in net for net in _INTERNAL)
