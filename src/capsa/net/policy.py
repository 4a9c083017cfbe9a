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
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from capsa.errors import ConfigError
from capsa.net.host_addresses import is_host_address

if TYPE_CHECKING:
    from capsa.net.policy_index import RuleIndex

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

    @property
    def base(self) -> str:
        """The normalized name: the pattern without its ``*.``."""
        return self._suffix

    @property
    def wildcard(self) -> bool:
        return self._wildcard

    def matches_name(self, name: str) -> bool:
        if self._wildcard:
            return name.endswith("." + self._suffix)
        return name == self._suffix

    def matches(self, flow: Flow) -> bool:
        return any(self.matches_name(name) for name in flow.names)

    def describe(self) -> str:
        return f"domain {self.pattern}"


_QUAD = r"(?:0|[1-9][0-9]{0,2})"
_PLAIN_CIDR = re.compile(rf"({_QUAD})\.({_QUAD})\.({_QUAD})\.({_QUAD})(?:/(0|[1-9][0-9]?))?")


def _parse_cidr(text: str) -> tuple[int, int]:
    """``(first address, prefix length)`` of an IPv4 address or network, host bits cleared. The
    common spellings are parsed here, the rest by :mod:`ipaddress` (a policy of 20,000 entries
    must not spend a quarter second in it); both accept and refuse the same texts."""
    plain = _PLAIN_CIDR.fullmatch(text)
    if plain is not None:
        *octets, length = plain.groups()
        prefixlen = 32 if length is None else int(length)
        values = [int(o) for o in octets]
        if prefixlen <= 32 and max(values) <= 255:
            address = values[0] << 24 | values[1] << 16 | values[2] << 8 | values[3]
            return address & _MASKS[prefixlen], prefixlen
    net = ipaddress.IPv4Network(text, strict=False)
    return int(net.network_address), net.prefixlen


_MASKS = [(0xFFFFFFFF << (32 - n)) & 0xFFFFFFFF for n in range(33)]


@dataclass(frozen=True)
class Cidr(Matcher):
    network: str
    _first: int = field(init=False, repr=False, compare=False)
    _prefixlen: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            if not isinstance(self.network, str):
                raise TypeError(f"expected a string, got {type(self.network).__name__}")
            first, prefixlen = _parse_cidr(self.network)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"invalid IPv4 address or network {self.network!r}: {exc}") from None
        object.__setattr__(self, "_first", first)
        object.__setattr__(self, "_prefixlen", prefixlen)

    @property
    def first(self) -> int:
        """The network's first address, as an integer."""
        return self._first

    @property
    def prefixlen(self) -> int:
        return self._prefixlen

    @property
    def last(self) -> int:
        return self._first | (~_MASKS[self._prefixlen] & 0xFFFFFFFF)

    def matches(self, flow: Flow) -> bool:
        return flow.dst_ip is not None and int(flow.dst_ip) & _MASKS[self._prefixlen] == self._first

    def describe(self) -> str:
        return f"cidr {ipaddress.IPv4Address(self._first)}/{self._prefixlen}"


def Ip(address: str) -> Cidr:
    """One IPv4 address."""
    if isinstance(address, str) and _PLAIN_CIDR.fullmatch(address) and "/" not in address:
        try:
            return Cidr(address + "/32")
        except ConfigError:
            pass  # an octet over 255: let ipaddress say so
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


class NetworkPolicy:
    """Immutable; every method returns a new policy. Start from ``allow_all()`` or ``deny_all()``.

    Adding a rule costs O(1) (the new policy points at the one it extends; the tuple of rules is
    made once, when first asked for), so a policy of n rules built one rule at a time costs O(n).
    Decisions use indexes over the rules (:mod:`capsa.net.policy_index`), built on the first one."""

    __slots__ = ("_default", "_index", "_last", "_parent", "_rules")

    def __init__(self, default: Action = Action.DENY, rules: Iterable[Rule] = ()) -> None:
        if not isinstance(default, Action):
            raise ConfigError(f"a policy's default is an Action, got {default!r:.40}")
        items = tuple(rules)
        if not all(isinstance(rule, Rule) for rule in items):
            raise ConfigError("a policy's rules are Rule(action, matcher) objects")
        self._default = default
        self._parent: NetworkPolicy | None = None
        self._last: Rule | None = None
        self._rules: tuple[Rule, ...] | None = items
        self._index: RuleIndex | None = None

    @property
    def default(self) -> Action:
        return self._default

    @property
    def rules(self) -> tuple[Rule, ...]:
        rules = self._rules
        if rules is None:
            newest: list[Rule] = []
            node: NetworkPolicy = self
            while node._rules is None:  # walk back to the nearest policy whose tuple exists
                assert node._parent is not None and node._last is not None
                newest.append(node._last)
                node = node._parent
            rules = self._rules = node._rules + tuple(reversed(newest))
            self._parent = self._last = None  # let the chain of intermediate policies go
        return rules

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NetworkPolicy):
            return NotImplemented
        return self._default is other._default and self.rules == other.rules

    def __hash__(self) -> int:
        return hash((self._default, self.rules))

    def __repr__(self) -> str:
        return f"NetworkPolicy(default={self._default}, rules={self.rules!r})"

    def __reduce__(self) -> tuple[type[NetworkPolicy], tuple[Action, tuple[Rule, ...]]]:
        """Pickled (to a Ray node, say) as its default and rules: not the chain of the policies it
        was built from, nor its indexes."""
        return NetworkPolicy, (self._default, self.rules)

    @classmethod
    def allow_all(cls) -> NetworkPolicy:
        return cls(Action.ALLOW)

    @classmethod
    def deny_all(cls) -> NetworkPolicy:
        return cls(Action.DENY)

    def rule(self, action: Action, matcher: Matcher) -> NetworkPolicy:
        if not isinstance(action, Action) or not isinstance(matcher, Matcher):
            raise ConfigError("rule() takes an Action and a matcher (Domain, Ip, Cidr, Port, All, ...)")
        new = NetworkPolicy.__new__(NetworkPolicy)
        new._default = self._default
        new._parent = self
        new._last = Rule(action, matcher)
        new._rules = None
        new._index = None
        return new

    def extend(self, rules: Iterable[Rule]) -> NetworkPolicy:
        """These rules after this policy's, in order."""
        return NetworkPolicy(self._default, (*self.rules, *rules))

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

    def _rule_index(self) -> RuleIndex:
        index = self._index
        if index is None:
            from capsa.net.policy_index import RuleIndex  # noqa: PLC0415 (it imports this module)

            index = self._index = RuleIndex(self._default, self.rules)
        return index

    def decide(self, flow: Flow) -> Decision:
        """The first ALLOW or DENY rule matching ``flow`` decides (else the default); ``logged``
        lists the LOG rules that match before it."""
        return self._rule_index().decide(flow)

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
        for the rest. ``logged`` lists the LOG rules that name the domain; ``rule`` is the rule
        that lets it out, or one that refuses it.
        """
        return self._rule_index().decide_name(normalize_name(name))


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
