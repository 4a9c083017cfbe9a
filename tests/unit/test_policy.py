"""The egress policy engine: matching, ordering, logging, DNS decisions, bad patterns."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from capsa.errors import ConfigError
from capsa.net.policy import (
    Action,
    All,
    AnyOf,
    Domain,
    Flow,
    Ip,
    NetworkPolicy,
    Port,
    is_internal,
)


def tcp(ip: str, port: int, *names: str) -> Flow:
    return Flow("tcp", IPv4Address(ip), port, frozenset(names))


POLICY = (
    NetworkPolicy.deny_all()
    .allow_domain("api.github.com")
    .allow_domain("*.rust-lang.org")
    .allow_ip("203.0.113.7")
    .allow_cidr("198.51.100.0/24")
    .log_domain("*.example.com")
    .deny_port(25)
)


def test_exact_and_wildcard_domains() -> None:
    assert POLICY.decide(tcp("140.82.1.1", 443, "api.github.com")).allowed
    assert POLICY.decide(tcp("140.82.1.1", 443, "API.GitHub.com".lower())).allowed
    assert POLICY.decide(tcp("1.1.1.1", 443, "static.rust-lang.org")).allowed
    assert POLICY.decide(tcp("1.1.1.1", 443, "a.b.rust-lang.org")).allowed
    assert not POLICY.decide(tcp("1.1.1.1", 443, "rust-lang.org")).allowed  # not the apex
    for lookalike in (
        "evil-github.com",
        "github.com.evil.test",
        "api.github.com.evil.test",
        "xrust-lang.org",
    ):
        assert not POLICY.decide(tcp("1.1.1.1", 443, lookalike)).allowed, lookalike


def test_domain_rules_need_a_pinned_name() -> None:
    # The same IP without a name this VM resolved (a literal IP, /etc/hosts) is denied.
    assert not POLICY.decide(tcp("140.82.1.1", 443)).allowed
    assert POLICY.decide(tcp("203.0.113.7", 80)).allowed  # explicit IP rule
    assert POLICY.decide(tcp("198.51.100.200", 22)).allowed
    assert not POLICY.decide(tcp("198.51.101.1", 22)).allowed


def test_first_match_wins_and_log_is_not_terminal() -> None:
    logged = POLICY.decide(tcp("93.184.216.34", 443, "www.example.com"))
    assert not logged.allowed and logged.rule == "default deny"
    assert logged.logged == ("log domain *.example.com",)
    policy = NetworkPolicy.allow_all().deny_port(25).allow_port(25)
    assert not policy.decide(tcp("1.2.3.4", 25)).allowed
    assert policy.decide(tcp("1.2.3.4", 26)).rule == "default allow"


def test_composable_rules_and_port_ranges() -> None:
    policy = NetworkPolicy.deny_all().rule(Action.ALLOW, All(Domain("pypi.org"), Port(443)))
    assert policy.decide(tcp("1.1.1.1", 443, "pypi.org")).allowed
    assert not policy.decide(tcp("1.1.1.1", 80, "pypi.org")).allowed
    ranged = NetworkPolicy.deny_all().allow_port(8000, 8100)
    assert (
        ranged.decide(tcp("1.1.1.1", 8050)).allowed and not ranged.decide(tcp("1.1.1.1", 8101)).allowed
    )
    either = NetworkPolicy.deny_all().rule(Action.ALLOW, AnyOf(Ip("10.1.1.1"), Port(53)))
    assert either.decide(tcp("10.1.1.1", 1)).allowed and either.decide(tcp("9.9.9.9", 53)).allowed
    assert not either.decide(tcp("9.9.9.9", 54)).allowed
    assert (
        NetworkPolicy.deny_all()
        .allow_protocol("udp")
        .decide(Flow("udp", IPv4Address("1.1.1.1"), 9))
        .allowed
    )


def test_dns_questions_for_denied_names_never_leave() -> None:
    assert POLICY.decide_name("api.github.com").allowed
    assert POLICY.decide_name("x.y.rust-lang.org.").allowed
    for name in ("rust-lang.org", "evil.test", "aGVsbG8.tunnel.evil.test", "www.example.com"):
        assert not POLICY.decide_name(name).allowed, name
    assert NetworkPolicy.deny_all().allow_ip("1.2.3.4").decide_name("anything.test").allowed is False
    assert NetworkPolicy.deny_all().allow_port(443).decide_name("anything.test").allowed
    denied_first = NetworkPolicy.allow_all().deny_domain("*.evil.test")
    assert not denied_first.decide_name("a.evil.test").allowed
    assert denied_first.decide_name("good.test").allowed


@pytest.mark.parametrize(
    "pattern", ["*", "a.*.b", "*.com", "", "x" * 254, "bad_label-.com", "sp ace.com", "*.", "a..b"]
)
def test_malformed_domain_patterns_are_config_errors(pattern: str) -> None:
    with pytest.raises(ConfigError):
        NetworkPolicy.deny_all().allow_domain(pattern)


def test_bad_ips_ports_and_internal_ranges() -> None:
    for bad in (lambda: Ip("300.1.1.1"), lambda: NetworkPolicy.deny_all().allow_cidr("10.0.0.0/33"),
                lambda: Port(0), lambda: Port(70000), lambda: Port(10, 5)):  # fmt: skip
        with pytest.raises(ConfigError):
            bad()
    for internal in (
        "127.0.0.1",
        "10.2.3.4",
        "192.168.1.1",
        "172.20.0.1",
        "169.254.169.254",
        "100.64.0.1",
    ):
        assert is_internal(IPv4Address(internal)), internal
    for public in ("1.1.1.1", "140.82.112.3", "203.0.113.7"):
        assert not is_internal(IPv4Address(public)), public
