"""E2B's sandbox network settings mapped onto capsa's :class:`NetworkPolicy`.

``allow_internet_access=False`` denies all egress; ``network={"allow_out": [...], "deny_out":
[...]}`` lists domains (``example.com``, ``*.example.com``), IPs and CIDRs. As in E2B, ``allow_out``
entries take precedence over ``deny_out`` ones: ``deny_out=["0.0.0.0/0"]`` with names in
``allow_out`` is an allowlist. Without any of these settings a sandbox gets no network interface at
all (capsa's default, and what lets it come from a warm pool).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from capsa.errors import ConfigError
from capsa.net.policy import Action, Cidr, Domain, Ip, NetworkPolicy, Rule
from capsa.server.entry import ApiError

MAX_ENTRIES = 1000  # per list: a request's policy costs the shared event loop O(entries)
MAX_ENTRY = 256  # characters: a domain has at most 253 (255 with "*.")
# a Host value (name or [IPv6], optional :port) once ${PORT} is substituted: no space, CR or LF
_MASK = re.compile(r"^[A-Za-z0-9._~\[\]:-]{1,255}$")


def _entries(network: dict[str, Any], *keys: str) -> list[str]:
    for key in keys:
        value = network.get(key)
        if value is None:
            continue
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ApiError(400, f"network.{key} must be a list of strings")
        if len(value) > MAX_ENTRIES:
            raise ApiError(
                400,
                f"network.{key} has {len(value)} entries; at most {MAX_ENTRIES} are accepted",
                hint="allow a wildcard domain (*.example.com) or a CIDR instead of many entries",
            )
        if any(len(v) > MAX_ENTRY for v in value):
            raise ApiError(400, f"network.{key} has an entry over {MAX_ENTRY} characters")
        return value
    return []


def _rule(action: Action, entry: str) -> Rule:
    text = entry.strip()
    try:
        if "/" in text:
            network = ipaddress.ip_network(text, strict=False)
            if network.version != 4:
                raise ApiError(400, f"only IPv4 networks are supported, got {entry!r}")
            return Rule(action, Cidr(str(network)))
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            return Rule(action, Domain(text))
        return Rule(action, Ip(str(address)))
    except (ConfigError, ValueError) as exc:
        raise ApiError(400, f"invalid network entry {entry!r}: {exc}") from None


def check_network(allow_internet_access: object, network: object) -> None:
    """Refuse malformed or oversized settings: cheap (no policy is built), so it runs before the
    server's admission checks, and :func:`e2b_policy` after them."""
    if network is not None and not isinstance(network, dict):
        raise ApiError(400, "network must be an object")
    if allow_internet_access is not None and not isinstance(allow_internet_access, bool):
        raise ApiError(400, "allow_internet_access must be a boolean")
    settings = network or {}
    _entries(settings, "allowOut", "allow_out")
    _entries(settings, "denyOut", "deny_out")
    public_traffic(settings)
    mask_request_host(settings)


def public_traffic(network: object) -> bool:
    """``network.allow_public_traffic`` (default true): false makes the sandbox's ports (ingress,
    ``get_host``) answer only requests that carry its traffic access token."""
    settings = network if isinstance(network, dict) else {}
    value = settings.get("allow_public_traffic", settings.get("allowPublicTraffic"))
    if value is None:
        return True
    if not isinstance(value, bool):
        raise ApiError(400, "network.allow_public_traffic must be a boolean")
    return value


def mask_request_host(network: object) -> str | None:
    """``network.mask_request_host``: the ``Host`` header the sandbox's servers see on ingress
    requests instead of the client's, ``${PORT}`` standing for the port (E2B's semantics)."""
    settings = network if isinstance(network, dict) else {}
    value = settings.get("mask_request_host", settings.get("maskRequestHost"))
    if value is None:
        return None
    if not isinstance(value, str) or not _MASK.match(value.replace("${PORT}", "1")):
        raise ApiError(
            400,
            "network.mask_request_host must be a host name with an optional :port",
            hint='letters, digits, ".", "-", ":" and ${PORT}, e.g. "app.example.com:${PORT}"',
        )
    return value


UPDATE_FIELDS = ("allowOut", "allow_out", "denyOut", "deny_out", "allow_internet_access",
                 "allowInternetAccess", "rules")  # fmt: skip


def update_policy(body: dict[str, Any]) -> NetworkPolicy:
    """The policy of an ``update_network`` request (``PUT /sandboxes/{id}/network``): it replaces
    the whole egress policy, and an omitted list is an empty one. Settings capsa does not enforce
    (egress proxies, DNS servers) are refused, never silently ignored; ``rules`` (header
    transforms) are the caller's (:mod:`capsa.server.server_secrets`)."""
    unknown = sorted(k for k, v in body.items() if k not in UPDATE_FIELDS and v not in (None, [], {}))
    if unknown:
        raise ApiError(400, f"update_network: {', '.join(unknown)} not supported by capsa serve",
                       hint="allow_out, deny_out, allow_internet_access and rules are")  # fmt: skip
    internet = body.get("allow_internet_access", body.get("allowInternetAccess"))
    check_network(internet, body)
    allow = _entries(body, "allowOut", "allow_out")
    deny = _entries(body, "denyOut", "deny_out")
    default = Action.DENY if internet is False else Action.ALLOW
    rules = [_rule(Action.ALLOW, entry) for entry in allow] + [_rule(Action.DENY, e) for e in deny]
    return NetworkPolicy(default, rules)


def e2b_policy(allow_internet_access: object, network: object) -> NetworkPolicy | None:
    """The policy for a create request, or None when the sandbox needs no network interface.
    Linear in the entries (at most :data:`MAX_ENTRIES` per list)."""
    check_network(allow_internet_access, network)
    settings = network if isinstance(network, dict) else {}
    allow = _entries(settings, "allowOut", "allow_out")
    deny = _entries(settings, "denyOut", "deny_out")
    if allow_internet_access is None and not allow and not deny:
        return None  # (ingress settings such as allow_public_traffic need no interface)
    if allow_internet_access is False and not allow:
        return None  # no egress at all: no interface (and a pooled sandbox)
    default = Action.DENY if allow_internet_access is False else Action.ALLOW
    # first match wins: allow_out before deny_out
    rules = [_rule(Action.ALLOW, entry) for entry in allow] + [_rule(Action.DENY, e) for e in deny]
    return NetworkPolicy(default, rules)
