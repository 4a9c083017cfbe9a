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
from capsa.net.host_addresses import is_host_address

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
    # decide_name's verdicts by which domain patterns match (a guest's flood of names costs one)
    _name_verdicts: dict[tuple[bool, ...], tuple[bool, str]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

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
        upstream, so DNS cannot carry data past the policy.

        A name resolves iff some TCP or UDP flow to it could be allowed: for some protocol, port
        and destination address, with ``names={name}``, the rules in order (first match, LOG rules
        not terminal) reach an ALLOW rule that does not rest on the address alone, or fall through
        to a default allow. A rule rests on the address alone when it would match the flow without
        the name too but not at every address: ``Ip``/``Cidr`` allowances (alone, or with ports and
        protocols) never make names resolvable, since the answer's address is not known yet and
        DNS would otherwise tunnel to names whose only allowed destinations are some addresses.
        ICMP and ``Proto("dns")`` rules never match a TCP/UDP flow, so they make nothing
        resolvable; a DENY rule covering only some ports or protocols leaves the name resolvable
        for the rest. ``logged`` lists the LOG rules that name the domain.
        """
        names = frozenset({normalize_name(name)})
        logged = tuple(
            rule.describe()
            for rule in self.rules
            if rule.action is Action.LOG and _names_domain(rule.matcher, names)
        )
        key = self._name_key(names)
        verdict = None if key is None else self._name_verdicts.get(key)
        if verdict is None:
            verdict = self._name_verdict(names)
            if key is not None:
                if len(self._name_verdicts) >= _MAX_NAME_VERDICTS:
                    self._name_verdicts.clear()
                self._name_verdicts[key] = verdict
        return Decision(verdict[0], verdict[1], logged)

    def _name_key(self, names: frozenset[str]) -> tuple[bool, ...] | None:
        """What the verdict for ``names`` depends on: which domain patterns match. ``None`` when a
        matcher of an unknown kind may look at the names some other way."""
        leaves = [leaf for rule in self.rules for leaf in _leaves(rule.matcher)]
        if not all(isinstance(leaf, (Domain, Cidr, Port, Proto)) for leaf in leaves):
            return None
        return tuple(leaf.matches_name(n) for leaf in leaves if isinstance(leaf, Domain) for n in names)

    def _name_verdict(self, names: frozenset[str]) -> tuple[bool, str]:
        """Evaluate the rules on one representative flow per cell of (protocol x port range x
        address range): matchers are constant on each cell, whose corners are the bounds of every
        ``Port`` and ``Cidr`` in the rules that can still match flows to ``names``."""
        rules = [(rule, _given_names(rule.matcher, names)) for rule in self.rules]
        live = [(rule, m) for rule, m in rules if m is not False and rule.action is not Action.LOG]
        if self.default is not Action.ALLOW and not any(r.action is Action.ALLOW for r, _ in live):
            first = Flow("tcp", ipaddress.IPv4Address(0), _FIRST_PORT, names)  # nothing can allow
            rule = next((r for r, m in live if _matches(m, first)), None)
            return False, "default deny" if rule is None else rule.describe()
        ports, addresses = _corners([m for _, m in live if not isinstance(m, bool)])
        refused: str | None = None
        for proto in ("tcp", "udp"):
            for port in ports:
                for address in addresses:
                    flow = Flow(proto, address, port, names)
                    rule = next((r for r, m in live if _matches(m, flow)), None)
                    if rule is None:
                        if self.default is Action.ALLOW:
                            return True, "default allow"
                        refused = refused or "default deny"
                    elif rule.action is Action.DENY:
                        refused = refused or rule.describe()
                    elif not _address_only(rule.matcher, flow, addresses):
                        return True, rule.describe()
        return False, refused or "only address rules allow it (they never make names resolvable)"


_MAX_NAME_VERDICTS = 1024
_FIRST_PORT, _LAST_PORT = 1, 65535
_LAST_ADDRESS = int(ipaddress.IPv4Address("255.255.255.255"))


def _leaves(matcher: Matcher) -> list[Matcher]:
    if isinstance(matcher, (All, AnyOf)):
        return [leaf for part in matcher.parts for leaf in _leaves(part)]
    return [matcher]


def _matches(matcher: Matcher | bool, flow: Flow) -> bool:
    return matcher if isinstance(matcher, bool) else matcher.matches(flow)


def _names_domain(matcher: Matcher, names: frozenset[str]) -> bool:
    """Does the matcher constrain the name, and accept this one?"""
    flow = Flow("tcp", names=names)
    if isinstance(matcher, Domain):
        return matcher.matches(flow)
    if isinstance(matcher, All):
        domains = [p for p in matcher.parts if isinstance(p, Domain)]
        return bool(domains) and all(d.matches(flow) for d in domains)
    if isinstance(matcher, AnyOf):
        return any(_names_domain(p, names) for p in matcher.parts)
    return False


def _given_names(matcher: Matcher, names: frozenset[str]) -> Matcher | bool:
    """The matcher with its domain patterns decided for ``names``: ``True``/``False`` when nothing
    else is left to decide, else what remains (ports, protocols, addresses)."""
    if isinstance(matcher, Domain):
        return any(matcher.matches_name(n) for n in names)
    if isinstance(matcher, (All, AnyOf)):
        decisive = isinstance(matcher, AnyOf)  # a True part decides AnyOf, a False part All
        rest: list[Matcher] = []
        for part in matcher.parts:
            value = _given_names(part, names)
            if value is decisive:
                return decisive
            if not isinstance(value, bool):
                rest.append(value)
        if not rest:
            return not decisive
        return rest[0] if len(rest) == 1 else type(matcher)(*rest)
    return matcher


def _corners(matchers: list[Matcher]) -> tuple[list[int], list[ipaddress.IPv4Address]]:
    """The lowest port and address of every cell the matchers' ``Port`` and ``Cidr`` bounds cut."""
    ports, addresses = {_FIRST_PORT}, {0}
    for leaf in (leaf for m in matchers for leaf in _leaves(m)):
        if isinstance(leaf, Port):
            high = leaf.low if leaf.high is None else leaf.high
            ports.update(p for p in (leaf.low, high + 1) if p <= _LAST_PORT)
        elif isinstance(leaf, Cidr):
            net = ipaddress.IPv4Network(leaf.network, strict=False)
            first, after = int(net.network_address), int(net.broadcast_address) + 1
            addresses.update(a for a in (first, after) if a <= _LAST_ADDRESS)
    return sorted(ports), [ipaddress.IPv4Address(a) for a in sorted(addresses)]


def _address_only(matcher: Matcher, flow: Flow, addresses: list[ipaddress.IPv4Address]) -> bool:
    """Does the match of ``flow`` rest on its address alone? True when the matcher also matches
    without the name, but not at every address."""
    if not matcher.matches(replace(flow, names=frozenset())):
        return False  # the name is needed: a domain rule (possibly narrowed to some addresses)
    return not all(matcher.matches(replace(flow, dst_ip=a)) for a in addresses)


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
    """Loopback, private, link-local/metadata, CGNAT, multicast or reserved, or an address of the
    host itself in whatever range (asked of the kernel each time: :mod:`capsa.net.host_addresses`):
    refused as destinations (and in DNS answers) unless the gateway opts in with
    ``allow_internal_destinations()``."""
    return any(address in net for net in _INTERNAL) or is_host_address(address)
