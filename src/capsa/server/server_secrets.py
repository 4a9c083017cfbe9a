"""Secrets in ``capsa serve``: the operator's (``--secrets-file``) and E2B's ``network.rules``
header transforms, both turned into the library's :class:`~capsa.net.secrets.Secret` (one proxy
applies them, docs/secrets.md).

- The operator names secrets in a TOML file, each with its value (or the server's environment
  variable holding it, so the value is not in the file), its hosts, and optionally the tenants that
  may use it and the templates whose every sandbox gets it. A create asks for more of them by name
  (``"capsa_secrets": ["NAME"]`` in its body). A sandbox's record keeps the names only: a resume,
  also after a restart, takes the values from the server's configuration again.
- ``network.rules`` (``{"api.example.com": [{"transform": {"headers": {"Authorization": "..."}}}]}``)
  become header secrets: the gateway sets those headers on the sandbox's requests to that host. The
  client sent the values: they are kept in this process's memory only, never in the state dir, so a
  sandbox resumed after a server restart comes back without them (logged).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import capsa
from capsa.errors import ConfigError
from capsa.net.rules import Domain
from capsa.net.secrets import MAX_VALUE, Secret, check_header_name, check_secrets, make_secret
from capsa.server.entry import ApiError
from capsa.server.network import e2b_policy

log = logging.getLogger(__name__)

MAX_RULE_HOSTS = 32  # hosts in network.rules
MAX_RULES = 8  # rules per host
MAX_HEADERS = 16  # headers per host, over its rules
MAX_TRANSFORM_BYTES = 64 << 10  # all header values of a create together
MAX_REQUESTED = 32  # names in capsa_secrets
_FIELDS = {"value", "env", "hosts", "allow_http", "header", "prefix", "tenants", "templates"}
SECRETS_FILE_HINT = (
    '[NAME] with env = "VAR" (or value = "..."), hosts = ["api.example.com"], and optionally '
    'header = "Authorization", allow_http, tenants = [...], templates = [...]'
)


@dataclass(frozen=True)
class Offered:
    """One operator secret and who gets it: ``tenants`` (None: every tenant) may ask for it; every
    sandbox of ``templates`` gets it without asking (if its tenant may use it)."""

    secret: Secret
    tenants: frozenset[str] | None
    templates: frozenset[str]

    def allows(self, tenant: str) -> bool:
        return self.tenants is None or tenant in self.tenants


def _strings(data: Mapping[str, Any], key: str, name: str) -> list[str] | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"secrets file: {name}.{key} must be a list of names")
    return value


def _offered(name: str, data: object, environ: Mapping[str, str]) -> Offered:
    if not isinstance(data, dict):
        raise ConfigError(f"secrets file: {name} must be a table", hint=SECRETS_FILE_HINT)
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        raise ConfigError(f"secrets file: {name} has unknown keys {unknown}", hint=SECRETS_FILE_HINT)
    if ("value" in data) == ("env" in data):
        raise ConfigError(
            f"secrets file: {name} needs exactly one of value or env", hint=SECRETS_FILE_HINT
        )
    value = data.get("value")
    if "env" in data:
        variable = data["env"]
        value = environ.get(variable) if isinstance(variable, str) else None
        if not value:
            raise ConfigError(
                f"secrets file: {name} reads the environment variable {variable!r}, which is not set",
                hint="export it in the server's environment before capsa serve starts",
            )
    allow_http = data.get("allow_http", False)
    if not isinstance(allow_http, bool):
        raise ConfigError(f"secrets file: {name}.allow_http must be true or false")
    hosts: Any = data.get("hosts")  # make_secret checks them (and the value, prefix, header)
    text = value if isinstance(value, str) else ""
    secret = make_secret(
        name, text, hosts, allow_http=allow_http, prefix=data.get("prefix"), header=data.get("header")
    )
    tenants = _strings(data, "tenants", name)
    return Offered(
        secret,
        None if tenants is None else frozenset(tenants),
        frozenset(_strings(data, "templates", name) or ()),
    )


class ServerSecrets:
    """The operator's secrets (empty without ``--secrets-file``) and the upstream CAs the proxy
    also trusts (``--upstream-ca``)."""

    def __init__(
        self, offered: dict[str, Offered] | None = None, upstream_cas: tuple[Path, ...] = ()
    ) -> None:
        self.offered = dict(offered or {})
        self.upstream_cas = upstream_cas

    @classmethod
    def load(
        cls,
        path: str | Path | None,
        upstream_cas: tuple[str, ...] = (),
        environ: Mapping[str, str] | None = None,
    ) -> ServerSecrets:
        cas = tuple(Path(p).expanduser() for p in upstream_cas)
        for ca in cas:
            if not ca.is_file():
                raise ConfigError(f"--upstream-ca: {ca} is not a file")
        if path is None:
            return cls({}, cas)
        try:
            data = tomllib.loads(Path(path).expanduser().read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read the secrets file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"secrets file {path}: {exc}", hint=SECRETS_FILE_HINT) from None
        env = os.environ if environ is None else environ
        offered = {name: _offered(name, table, env) for name, table in data.items()}
        log.info("secrets offered: %s", ", ".join(repr(o.secret) for o in offered.values()) or "none")
        return cls(offered, cas)

    def names_for(
        self, requested: object, template: str, tenant: str
    ) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The operator secrets a create gets: those of its template (that its tenant may use),
        and those it asked for by name (400 for an unknown name, 403 for one its tenant may not
        use: the same answer either way would hide typos)."""
        if requested is None:
            requested = []
        if (
            not isinstance(requested, list)
            or len(requested) > MAX_REQUESTED
            or not all(isinstance(n, str) for n in requested)
        ):
            raise ApiError(400, f"capsa_secrets must be a list of at most {MAX_REQUESTED} names")
        given = [n for n, o in self.offered.items() if template in o.templates and o.allows(tenant)]
        names: list[str] = []
        for name in requested:
            offered = self.offered.get(name)
            if offered is None:
                yours = sorted(n for n, o in self.offered.items() if o.allows(tenant))
                known = ", ".join(yours) or "none"
                # the hint goes in the message: the API's error body has a message only
                raise ApiError(400, f"unknown secret {name!r:.80} (this server offers you: {known})",
                               hint="the server's --secrets-file names the secrets")  # fmt: skip
            if not offered.allows(tenant):
                raise ApiError(
                    403,
                    f"secret {name!r} is not offered to tenant {tenant!r}",
                    hint="the server's --secrets-file lists the tenants of each secret",
                )
            if name not in names:
                names.append(name)
        return tuple(n for n in given if n not in names), tuple(names)

    def resolve(self, names: tuple[str, ...], sandbox_id: str = "") -> tuple[Secret, ...]:
        """The secrets named (a record's): a name the configuration no longer has is left out."""
        found = []
        for name in names:
            offered = self.offered.get(name)
            if offered is None:
                log.warning(
                    "sandbox %s: secret %s is no longer offered; it goes without", sandbox_id, name
                )
                continue
            found.append(offered.secret)
        return tuple(found)

    def gateway(self, gateway: capsa.Gateway, secrets: tuple[Secret, ...]) -> capsa.Gateway:
        """``gateway`` with ``secrets`` bound (and the upstream CAs trusted)."""
        for ca in self.upstream_cas:
            gateway = gateway.upstream_ca(ca)
        return replace(gateway, secrets=secrets) if secrets else gateway


def _host(host: object) -> str:
    if not isinstance(host, str) or not host or len(host) > 253:
        raise ApiError(400, "network.rules keys are host names such as 'api.example.com'")
    if "*" in host or "/" in host or ":" in host:
        raise ApiError(
            400,
            f"network.rules: {host!r:.80} is not a single host name",
            hint="capsa sets headers per host name: no wildcard, CIDR, IP address or port",
        )
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(host)
        raise ApiError(
            400,
            f"network.rules: {host!r} is an IP address",
            hint="headers are set on requests to a host name",
        )
    try:
        return Domain(host).base
    except ConfigError as exc:
        raise ApiError(400, f"network.rules: invalid host {host!r:.80}: {exc.message}") from None


def _headers(host: str, rules: object) -> dict[str, str]:
    if not isinstance(rules, list) or len(rules) > MAX_RULES:
        raise ApiError(400, f"network.rules[{host!r}] must be a list of at most {MAX_RULES} rules")
    headers: dict[str, str] = {}
    for rule in rules:
        if not isinstance(rule, dict) or set(rule) - {"transform"}:
            raise ApiError(400, f"network.rules[{host!r}]: a rule is {{'transform': {{...}}}}")
        transform = rule.get("transform") or {}
        if not isinstance(transform, dict) or set(transform) - {"headers"}:
            raise ApiError(
                400,
                f"network.rules[{host!r}]: a transform has only headers",
                hint="capsa sets request headers; other transforms are not supported",
            )
        given = transform.get("headers") or {}
        if not isinstance(given, dict):
            raise ApiError(400, f"network.rules[{host!r}]: headers must map names to values")
        for name, value in given.items():
            try:
                check_header_name(name)
            except ConfigError as exc:
                raise ApiError(400, f"network.rules[{host!r}]: {exc.message}", hint=exc.hint) from None
            if not isinstance(value, str) or not 0 < len(value) <= MAX_VALUE:
                raise ApiError(
                    400,
                    f"network.rules[{host!r}]: the value of header {name} must be a "
                    f"non-empty string of at most {MAX_VALUE} characters",
                )
            if any(not 0x20 <= ord(c) < 0x7F for c in value):
                raise ApiError(
                    400,
                    f"network.rules[{host!r}]: the value of header {name} has "
                    "characters that cannot go in an HTTP header (CR, LF, control or "
                    "non-ASCII)",
                )
            headers = {k: v for k, v in headers.items() if k.lower() != name.lower()}
            headers[name] = value  # a later rule's header replaces an earlier one's
    if len(headers) > MAX_HEADERS:
        raise ApiError(
            400, f"network.rules[{host!r}] sets {len(headers)} headers; at most {MAX_HEADERS}"
        )
    return headers


def transforms(network: object) -> tuple[Secret, ...]:
    """E2B's ``network.rules`` as header secrets (checked: 400 for anything capsa cannot apply)."""
    rules = network.get("rules") if isinstance(network, dict) else None
    if rules is None:
        return ()
    if not isinstance(rules, dict) or len(rules) > MAX_RULE_HOSTS:
        raise ApiError(400, f"network.rules must map at most {MAX_RULE_HOSTS} hosts to rules")
    made: list[Secret] = []
    total = 0
    for host, host_rules in rules.items():
        name = _host(host)
        for header, value in _headers(name, host_rules).items():
            total += len(value)
            made.append(
                make_secret(
                    f"E2B_RULE_{len(made) + 1}",
                    value,
                    [name],
                    allow_http=False,
                    prefix=None,
                    header=header,
                )
            )
    if total > MAX_TRANSFORM_BYTES:
        raise ApiError(
            400, f"network.rules header values total {total} bytes; at most {MAX_TRANSFORM_BYTES}"
        )
    return tuple(made)


def _usable(secret: Secret, policy: capsa.NetworkPolicy) -> bool:
    try:
        check_secrets((secret,), policy)
    except ConfigError:
        return False
    return True


def secrets_policy(
    policy: capsa.NetworkPolicy | None,
    secrets: tuple[Secret, ...],
    allow_internet_access: object,
    optional: tuple[Secret, ...] = (),
) -> tuple[capsa.NetworkPolicy | None, tuple[Secret, ...]]:
    """The policy of a create with ``secrets`` (asked for, or its rules) and ``optional`` ones (its
    template's), and the optional ones it keeps. The policy is the create's own, whose hosts each
    asked-for secret must be allowed by (400 if not; an optional one is left out), or, when the
    create asked for no network, one that reaches the secrets' hosts alone
    (``allow_internet_access=False``: none, and no optional secret)."""
    if policy is not None or allow_internet_access is False:
        optional = tuple(s for s in optional if _usable(s, policy or capsa.NetworkPolicy.deny_all()))
    everything = secrets + optional
    if not everything:
        return policy, ()
    if policy is None:
        policy = capsa.NetworkPolicy.deny_all()
        if allow_internet_access is not False:
            for pattern in dict.fromkeys(h.domain.pattern for s in everything for h in s.hosts):
                policy = policy.allow_domain(pattern)
    try:
        check_secrets(secrets, policy)
    except ConfigError as exc:
        raise ApiError(400, exc.message, hint="allow the host in network.allow_out") from None
    return policy, optional


@dataclass(frozen=True)
class Egress:
    """What a create's sandbox is built with: its policy (made by ``make_policy`` once its slot is
    taken), its operator secrets (names) and its header rules."""

    make_policy: Callable[[], capsa.NetworkPolicy | None]
    names: tuple[str, ...] = ()
    transforms: tuple[Secret, ...] = ()


def create_egress(
    offered: ServerSecrets, body: dict[str, Any], template: str, tenant: str, *, internet: object
) -> Egress:
    """A create request's network, secrets and rules (checked: 400 or 403). Without secrets or
    rules its policy is made later (a refused request costs nothing for its lists); with them it is
    made now, since which secrets it allows decides."""
    network, allow_internet_access = body.get("network"), internet
    rules = transforms(network)
    given, asked = offered.names_for(body.get("capsa_secrets"), template, tenant)
    if not (given or asked or rules):
        return Egress(lambda: e2b_policy(allow_internet_access, network))
    policy, kept = secrets_policy(
        e2b_policy(allow_internet_access, network), offered.resolve(asked) + rules,
        allow_internet_access, offered.resolve(given),
    )  # fmt: skip
    return Egress(lambda: policy, tuple(s.name for s in kept) + asked, rules)


def live_headers(
    network: Any, operator: tuple[Secret, ...], rules: tuple[Secret, ...],
    policy: capsa.NetworkPolicy, *, changed: bool,
) -> tuple[Secret, ...] | None:  # fmt: skip
    """The header secrets a running sandbox's ``network`` (its stack) takes for an update with
    ``rules`` under ``policy`` (its operator's header secrets that the policy allows, then the
    rules), or None when its headers do not change. 409 if they cannot change live: its guest has
    no CA for a new host (its CA was made for the hosts bound at its build or resume)."""
    if not changed:
        return None
    session = getattr(network, "secret_session", None)
    uncovered = [str(h) for s in rules for h in s.hosts if session is None or not session.covers(s)]
    if uncovered:
        raise ApiError(
            409,
            f"network.rules for {', '.join(sorted(set(uncovered)))} cannot be added to the running "
            "sandbox: its guest trusts a CA made for the hosts it had rules or secrets for when it "
            "started",
            hint="pause the sandbox, update its network, and resume it (a resume gets a new CA)",
        )
    kept = tuple(s for s in operator if s.header is not None and _usable(s, policy))
    return kept + rules
