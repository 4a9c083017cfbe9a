"""A policy's parts: actions, the flow a rule is matched against, the matchers (``Domain``, ``Cidr``/
``Ip``, ``Port``, ``Proto``, ``All``, ``AnyOf``), rules and decisions. :mod:`capsa.net.policy` makes
policies of them and :mod:`capsa.net.policy_index` indexes them; both import this, not each other.
Re-exported by :mod:`capsa.net.policy`, where users find them."""

from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass, field
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
