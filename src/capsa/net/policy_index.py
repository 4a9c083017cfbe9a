"""Indexes over a policy's rules, so that a verdict on 20,000 rules costs about what one on 20 does
(the host's event loop decides every flow and every DNS question of every guest).

Rules come in three kinds:

* name rules, whose matcher is one :class:`Domain`: found from a name in a dict of exact names and
  one of wildcard suffixes (looked up for each proper suffix of the name: at most 127 lookups);
* address rules, whose matcher is one :class:`Cidr`: found from an address in one dict per prefix
  length (at most 33 lookups);
* the other rules (ports, protocols, ``All``/``AnyOf``, matchers of other kinds), scanned in
  order as before. They are few in practice (the E2B mapping of ``capsa serve`` makes none).

A flow's verdict is the first match in rule order: the smallest index among the candidates the
indexes give and the other rules that match.

A DNS verdict (:meth:`NetworkPolicy.decide_name`) asks whether some (protocol, port, address) lets
the name out. The other rules cut that space into cells on which they are constant (at the bounds
of their ``Port`` and ``Cidr`` parts). The address rules cut the address range further, but only
address: the first of them to match at each address, ``F(a)``, comes from a partition of the
address range made once per policy (CIDRs nest or are disjoint, so a sweep finds it). In a cell
where the first name or other rule that applies has index ``j``, an address reaches rule ``j`` iff
``F(a) > j``, and an address an address rule decides first never lets a name out (a CIDR allowance
rests on the address alone, see ``decide_name``; ``0.0.0.0/0``, which does not, is taken as a rule
that matches everywhere). So a cell lets the name out iff rule ``j`` (or the default) does and the
largest ``F`` over the cell exceeds ``j``: the cost no longer grows with the address rules.
"""

from __future__ import annotations

import bisect
import ipaddress
from collections.abc import Iterator, Sequence
from dataclasses import replace

from capsa.net.rules import Action, All, AnyOf, Cidr, Decision, Domain, Flow, Matcher, Port, Proto, Rule

_NONE = 1 << 62  # the index of "no rule": after every rule
_FIRST_PORT, _LAST_PORT = 1, 65535
_ADDRESSES = 1 << 32
_MASKS = [(0xFFFFFFFF << (32 - n)) & 0xFFFFFFFF for n in range(33)]
_MAX_NAME_VERDICTS = 1024
_ONLY_ADDRESSES = "only address rules allow it (they never make names resolvable)"


class RuleIndex:
    """The decisions of one policy (its default and rules), from indexes built once."""

    def __init__(self, default: Action, rules: Sequence[Rule]) -> None:
        self._default = default
        self._rules = rules
        self._exact: dict[str, list[int]] = {}  # name -> indices of its rules, ascending
        self._suffixes: dict[str, list[int]] = {}  # "rust-lang.org" for "*.rust-lang.org"
        self._networks: dict[int, dict[int, list[int]]] = {}  # prefix length -> first address ->
        self._others: list[int] = []
        for i, rule in enumerate(rules):
            matcher = rule.matcher
            if type(matcher) is Domain:
                table = self._suffixes if matcher.wildcard else self._exact
                table.setdefault(matcher.base, []).append(i)
            elif type(matcher) is Cidr:
                by_first = self._networks.setdefault(matcher.prefixlen, {})
                by_first.setdefault(matcher.first, []).append(i)
            else:
                self._others.append(i)
        self._model: _NameModel | None = None  # for DNS verdicts, made on the first
        # DNS verdicts by what they depend on (a guest's flood of names costs one each at most)
        self._name_verdicts: dict[tuple[int, tuple[bool, ...]], tuple[bool, str]] = {}

    def _name_rules(self, name: str) -> Iterator[list[int]]:
        hits = self._exact.get(name)
        if hits:
            yield hits
        if self._suffixes:
            dot = name.find(".")
            while dot >= 0:
                hits = self._suffixes.get(name[dot + 1 :])
                if hits:
                    yield hits
                dot = name.find(".", dot + 1)

    def _address_rules(self, address: int) -> Iterator[list[int]]:
        for prefixlen, by_first in self._networks.items():
            hits = by_first.get(address & _MASKS[prefixlen])
            if hits:
                yield hits

    def _first_terminal(self, hits: list[int]) -> int:
        return next((i for i in hits if self._rules[i].action is not Action.LOG), _NONE)

    def decide(self, flow: Flow) -> Decision:
        rules = self._rules
        first = _NONE  # the deciding rule so far
        logs: set[int] = set()
        candidates = [hits for name in flow.names for hits in self._name_rules(name)]
        if flow.dst_ip is not None:
            candidates += self._address_rules(int(flow.dst_ip))
        for hits in candidates:
            for i in hits:
                if i >= first:
                    break
                if rules[i].action is Action.LOG:
                    logs.add(i)
                else:
                    first = i
                    break
        for i in self._others:
            if i >= first:
                break
            if rules[i].matcher.matches(flow):
                if rules[i].action is Action.LOG:
                    logs.add(i)
                else:
                    first = i
                    break
        logged = tuple(rules[i].describe() for i in sorted(logs) if i < first)
        if first == _NONE:
            return Decision(self._default is Action.ALLOW, f"default {self._default.value}", logged)
        return Decision(rules[first].action is Action.ALLOW, rules[first].describe(), logged)

    def decide_name(self, name: str) -> Decision:
        """See :meth:`NetworkPolicy.decide_name`; ``name`` is normalized."""
        names = frozenset({name})
        rules = self._rules
        hits = list(self._name_rules(name))
        logs = {i for h in hits for i in h if rules[i].action is Action.LOG}
        logs.update(
            i
            for i in self._others
            if rules[i].action is Action.LOG and _names_domain(rules[i].matcher, names)
        )
        logged = tuple(rules[i].describe() for i in sorted(logs))
        named = min((self._first_terminal(h) for h in hits), default=_NONE)
        model = self._model
        if model is None:
            model = self._model = _NameModel(self._default, rules, self._others, self._networks)
        key = None
        if model.domains is not None:
            key = (named, tuple(domain.matches_name(name) for domain in model.domains))
        verdict = None if key is None else self._name_verdicts.get(key)
        if verdict is None:
            verdict = model.verdict(named, names)
            if key is not None:
                if len(self._name_verdicts) >= _MAX_NAME_VERDICTS:
                    self._name_verdicts.clear()
                self._name_verdicts[key] = verdict
        return Decision(verdict[0], verdict[1], logged)


class _NameModel:
    """What DNS verdicts share, made once per policy: the cells of the other rules, the first
    address rule matching in each part of each cell, the first ``0.0.0.0/0`` rule."""

    def __init__(
        self,
        default: Action,
        rules: Sequence[Rule],
        others: list[int],
        networks: dict[int, dict[int, list[int]]],
    ) -> None:
        self._default = default
        self._rules = rules
        self._others = [i for i in others if rules[i].action is not Action.LOG]
        leaves = [leaf for i in self._others for leaf in _leaves(rules[i].matcher)]
        # the verdict depends on the name only through these (None: a matcher of an unknown kind
        # may look at the name some other way, so verdicts are not cached)
        self.domains: list[Domain] | None = [leaf for leaf in leaves if isinstance(leaf, Domain)]
        if not all(isinstance(leaf, (Domain, Cidr, Port, Proto)) for leaf in leaves):
            self.domains = None
        self._ports, bounds = _corners(leaves)
        self._addresses = [ipaddress.IPv4Address(a) for a in bounds]
        everywhere = networks.get(0, {}).get(0, [])
        self._everywhere = next((i for i in everywhere if rules[i].action is not Action.LOG), _NONE)
        blocks: list[tuple[int, int, int]] = []
        for prefixlen, by_first in networks.items():
            for first, hits in by_first.items():
                i = next((i for i in hits if rules[i].action is not Action.LOG), _NONE)
                if prefixlen and i < self._everywhere:
                    blocks.append((first, first + (1 << (32 - prefixlen)), i))
        starts, values = _first_matches(blocks)
        # per cell of the address range: the largest F over it, and F at its first address
        self._cells: list[tuple[int, int]] = []
        for k, low in enumerate(bounds):
            high = bounds[k + 1] if k + 1 < len(bounds) else _ADDRESSES
            begin = bisect.bisect_right(starts, low) - 1
            end = bisect.bisect_left(starts, high)
            self._cells.append((max(values[begin:end]), values[begin]))

    def verdict(self, named: int, names: frozenset[str]) -> tuple[bool, str]:
        """``named``: the first ALLOW or DENY name rule matching ``names`` (``_NONE``: none)."""
        rules = self._rules
        stop = min(named, self._everywhere)  # no rule after it is ever reached
        others: list[tuple[int, Matcher | bool]] = []
        for i in self._others:
            if i >= stop:
                break
            given = _given_names(rules[i].matcher, names)
            if given is not False:
                others.append((i, given))
        refused: str | None = None
        for proto in ("tcp", "udp"):
            for port in self._ports:
                for (largest, at_low), address in zip(self._cells, self._addresses, strict=True):
                    flow = Flow(proto, address, port, names)
                    j = next((i for i, given in others if _matches(given, flow)), stop)
                    lets_out, reason = self._outcome(j, flow)
                    if lets_out and largest >= j:  # some address of the cell reaches rule j
                        assert reason is not None
                        return True, reason
                    if at_low < j:  # an address rule decides the cell's first address
                        first = rules[at_low]
                        refusal = first.describe() if first.action is Action.DENY else None
                    else:
                        refusal = reason
                    if refusal is None and largest >= j:
                        refusal = reason
                    refused = refused or refusal
        return False, refused or _ONLY_ADDRESSES

    def _outcome(self, j: int, flow: Flow) -> tuple[bool, str | None]:
        """Does rule ``j`` (``_NONE``: the default) let ``flow`` out, and what does that: the rule,
        the rule or default refusing it, or None when it is allowed by its address alone."""
        if j == _NONE:
            return self._default is Action.ALLOW, f"default {self._default.value}"
        rule = self._rules[j]
        if rule.action is Action.DENY:
            return False, rule.describe()
        if _address_only(rule.matcher, flow, self._addresses):
            return False, None
        return True, rule.describe()


def _first_matches(blocks: list[tuple[int, int, int]]) -> tuple[list[int], list[int]]:
    """The address range cut where the first matching block changes: the starts of the parts,
    and for each the smallest index of the blocks ``(first, end, index)`` covering it (``_NONE``
    where none does). CIDR blocks nest or are disjoint, so one sweep over them, sorted, does."""
    blocks.sort(key=lambda block: (block[0], -block[1]))  # a block before those inside it
    starts, values = [0], [_NONE]
    open_blocks: list[tuple[int, int]] = []  # (end, first match inside) of those around the sweep

    def mark(at: int, value: int) -> None:
        if starts[-1] == at:
            values[-1] = value
            if len(values) > 1 and values[-2] == value:
                starts.pop()
                values.pop()
        elif values[-1] != value:
            starts.append(at)
            values.append(value)

    def close_until(at: int) -> None:
        while open_blocks and open_blocks[-1][0] <= at:
            end = open_blocks.pop()[0]
            mark(end, open_blocks[-1][1] if open_blocks else _NONE)

    for first, end, index in blocks:
        close_until(first)
        value = min(index, open_blocks[-1][1]) if open_blocks else index
        open_blocks.append((end, value))
        mark(first, value)
    close_until(_ADDRESSES)
    return starts, values


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


def _corners(leaves: list[Matcher]) -> tuple[list[int], list[int]]:
    """The lowest port and address of every cell the ``Port`` and ``Cidr`` bounds cut."""
    ports, addresses = {_FIRST_PORT}, {0}
    for leaf in leaves:
        if isinstance(leaf, Port):
            high = leaf.low if leaf.high is None else leaf.high
            ports.update(p for p in (leaf.low, high + 1) if p <= _LAST_PORT)
        elif isinstance(leaf, Cidr):
            addresses.update(a for a in (leaf.first, leaf.last + 1) if a < _ADDRESSES)
    return sorted(ports), sorted(addresses)


def _address_only(matcher: Matcher, flow: Flow, addresses: list[ipaddress.IPv4Address]) -> bool:
    """Does the match of ``flow`` rest on its address alone? True when the matcher also matches
    without the name, but not at every address."""
    if not matcher.matches(replace(flow, names=frozenset())):
        return False  # the name is needed: a domain rule (possibly narrowed to some addresses)
    return not all(matcher.matches(replace(flow, dst_ip=a)) for a in addresses)
