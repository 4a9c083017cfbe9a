"""E2B's sandbox network settings mapped onto capsa's :class:`NetworkPolicy`.

``allow_internet_access=False`` denies all egress; ``network={"allow_out": [...], "deny_out":
[...]}`` lists domains (``example.com``, ``*.example.com``), IPs and CIDRs. As in E2B, ``allow_out``
entries take precedence over ``deny_out`` ones: ``deny_out=["0.0.0.0/0"]`` with names in
``allow_out`` is an allowlist. Without any of these settings a sandbox gets no network interface at
all (capsa's default, and what lets it come from a warm pool).
"""

from __future__ import annotations

import ipaddress
from typing import Any

from capsa.errors import ConfigError
from capsa.net.policy import Action, NetworkPolicy
from capsa.server.registry import ApiError


def _entries(network: dict[str, Any], *keys: str) -> list[str]:
    for key in keys:
        value = network.get(key)
        if value is None:
            continue
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ApiError(400, f"network.{key} must be a list of strings")
        return value
    return []


def _add(policy: NetworkPolicy, action: Action, entry: str) -> NetworkPolicy:
    text = entry.strip()
    try:
        if "/" in text:
            network = ipaddress.ip_network(text, strict=False)
            if network.version != 4:
                raise ApiError(400, f"only IPv4 networks are supported, got {entry!r}")
            return (
                policy.deny_cidr(str(network))
                if action is Action.DENY
                else policy.allow_cidr(str(network))
            )
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            return policy.deny_domain(text) if action is Action.DENY else policy.allow_domain(text)
        return policy.deny_ip(str(address)) if action is Action.DENY else policy.allow_ip(str(address))
    except (ConfigError, ValueError) as exc:
        raise ApiError(400, f"invalid network entry {entry!r}: {exc}") from None


def e2b_policy(allow_internet_access: object, network: object) -> NetworkPolicy | None:
    """The policy for a create request, or None when the sandbox needs no network interface."""
    if network is not None and not isinstance(network, dict):
        raise ApiError(400, "network must be an object")
    if allow_internet_access is not None and not isinstance(allow_internet_access, bool):
        raise ApiError(400, "allow_internet_access must be a boolean")
    settings = network or {}
    allow = _entries(settings, "allowOut", "allow_out")
    deny = _entries(settings, "denyOut", "deny_out")
    if allow_internet_access is None and not network:
        return None
    if allow_internet_access is False and not allow:
        return None  # no egress at all: no interface (and a pooled sandbox)
    policy = NetworkPolicy.deny_all() if allow_internet_access is False else NetworkPolicy.allow_all()
    for entry in allow:  # first match wins: allow_out before deny_out
        policy = _add(policy, Action.ALLOW, entry)
    for entry in deny:
        policy = _add(policy, Action.DENY, entry)
    return policy
