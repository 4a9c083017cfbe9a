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

import ipaddress
from collections.abc import Iterable

from capsa.errors import ConfigError
from capsa.net.host_addresses import is_host_address
from capsa.net.policy_index import RuleIndex
from capsa.net.rules import (
    MAX_NAME,
    PROTOCOLS,
    Action,
    All,
    AnyOf,
    Cidr,
    Decision,
    Domain,
    Flow,
    Ip,
    Matcher,
    Port,
    Proto,
    Protocol,
    Rule,
    normalize_name,
)


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


# The rule types live in capsa.net.rules (shared with the index); users import them from here.
__all__ = [
    "MAX_NAME",
    "PROTOCOLS",
    "Action",
    "All",
    "AnyOf",
    "Cidr",
    "Decision",
    "Domain",
    "Flow",
    "Ip",
    "Matcher",
    "NetworkPolicy",
    "Port",
    "Proto",
    "Protocol",
    "Rule",
    "is_internal",
    "normalize_name",
]
