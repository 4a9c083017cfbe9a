"""E2B network settings -> capsa NetworkPolicy decisions (pure logic, no guest)."""

from __future__ import annotations

import ipaddress

import pytest

from capsa.net.policy import Flow
from capsa.server.entry import ApiError
from capsa.server.network import e2b_policy, update_policy


def allowed(policy: object, ip: str, names: tuple[str, ...] = ()) -> bool:
    flow = Flow("tcp", ipaddress.IPv4Address(ip), 80, frozenset(names))
    return bool(policy.decide(flow).allowed)  # type: ignore[attr-defined]


def test_no_settings_means_no_network() -> None:
    assert e2b_policy(None, None) is None
    assert e2b_policy(False, None) is None  # no egress at all: no interface
    assert e2b_policy(None, {}) is None


def test_allow_out_takes_precedence_over_deny_out() -> None:
    policy = e2b_policy(None, {"allowOut": ["allowed.test", "10.1.2.3"], "denyOut": ["0.0.0.0/0"]})
    assert allowed(policy, "203.0.113.7", ("allowed.test",))
    assert allowed(policy, "10.1.2.3")
    assert not allowed(policy, "203.0.113.7", ("other.test",))
    assert not allowed(policy, "203.0.113.8")
    assert policy.decide_name("allowed.test").allowed
    assert not policy.decide_name("other.test").allowed


def test_deny_out_alone_blocks_only_what_it_names() -> None:
    policy = e2b_policy(True, {"denyOut": ["198.51.100.0/24", "*.blocked.test"]})
    assert allowed(policy, "203.0.113.7")
    assert not allowed(policy, "198.51.100.9")
    assert not allowed(policy, "203.0.113.7", ("x.blocked.test",))


def test_no_internet_with_an_allowlist() -> None:
    policy = e2b_policy(False, {"allow_out": ["pypi.test"]})
    assert allowed(policy, "203.0.113.7", ("pypi.test",))
    assert not allowed(policy, "203.0.113.7")


@pytest.mark.parametrize(
    "network",
    [{"allowOut": "x.test"}, {"denyOut": [1]}, {"allowOut": ["bad domain!"]}, {"denyOut": ["::/0"]}, []],
)
def test_malformed_settings_are_refused(network: object) -> None:
    with pytest.raises(ApiError) as failed:
        e2b_policy(None, network)
    assert failed.value.status == 400


def test_update_network_replaces_everything() -> None:
    """``update_network`` replaces the whole policy: omitted lists are empty, an empty body allows
    all, and settings capsa does not enforce are refused rather than ignored."""
    assert allowed(update_policy({}), "203.0.113.7")
    assert not allowed(update_policy({"allow_internet_access": False}), "203.0.113.7")
    allowlist = update_policy({"allowOut": ["allowed.test"], "denyOut": ["0.0.0.0/0"]})
    assert allowed(allowlist, "203.0.113.7", ("allowed.test",))
    assert not allowed(allowlist, "203.0.113.7")
    assert not allowed(update_policy({"denyOut": ["denied.test"]}), "203.0.113.7", ("denied.test",))
    for bad in (
        {"egressProxy": {"address": "proxy.test:3128"}},
        {"dnsServers": ["1.1.1.1"]},
        {"allowOut": "allowed.test"},
        {"denyOut": ["not a domain!"]},
        {"allow_internet_access": "yes"},
    ):
        with pytest.raises(ApiError) as raised:
            update_policy(bad)
        assert raised.value.status == 400, bad
