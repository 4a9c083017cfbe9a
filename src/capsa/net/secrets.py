"""Secrets that never enter the sandbox: :class:`Secret` (configuration) and :class:`SecretSession`
(one sandbox's placeholders and CA).

A secret takes one of two forms, both applied by the same proxy (:mod:`capsa.net.intercept`) to the
requests it intercepted to one of the secret's hosts:

- a placeholder (the default): the guest sees ``NAME=<placeholder>`` in its environment; the gateway
  swaps the placeholder for the value;
- a header (``header="Authorization"``): the guest sees nothing; the gateway sets that header to the
  value on every request to the hosts (E2B's ``network.rules`` transforms).

The value lives in this process alone: :class:`Secret`'s ``repr`` and pickling never show it.
"""

from __future__ import annotations

import re
import secrets as _random
import string
from dataclasses import dataclass, field

from capsa.errors import ConfigError
from capsa.net.ca import SandboxCA
from capsa.net.policy import NetworkPolicy
from capsa.net.rules import Domain

DEFAULT_PORTS = (443, 80)  # a host without ``:port``: HTTPS on 443 (and plain HTTP on 80 if allowed)
MIN_RANDOM = 40  # characters of base62 in every placeholder (~238 bits)
MAX_PLACEHOLDER = 512
MAX_VALUE = 8192
_ALPHABET = string.ascii_letters + string.digits
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_HEADER = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,128}")  # an HTTP token
# Headers that frame or route a request: the proxy and the server must agree on them, so a secret
# never sets one (the proxy relays bodies by the guest's framing).
FRAMING_HEADERS = frozenset({
    "host", "content-length", "transfer-encoding", "connection", "upgrade", "te", "trailer",
    "keep-alive", "proxy-connection", "expect",
})  # fmt: skip
# Well-known, public key-type markers: a placeholder keeps the value's one, so client libraries that
# check a key's prefix accept it. Nothing else of the value ever reaches the placeholder.
KNOWN_PREFIXES = (
    "sk-ant-api03-", "sk-ant-", "sk-proj-", "sk-", "github_pat_", "ghp_", "gho_", "ghu_", "ghs_",
    "ghr_", "glpat-", "xoxb-", "xoxp-", "hf_", "sk_live_", "sk_test_", "rk_live_", "rk_test_",
    "AIza", "gsk_", "pplx-", "r8_", "npm_", "pypi-",
)  # fmt: skip


@dataclass(frozen=True)
class SecretHost:
    """One host a secret is bound to: a domain pattern (``*.example.com`` allowed) and the ports
    whose flows are intercepted (443 and 80 unless one was named)."""

    domain: Domain
    ports: tuple[int, ...]

    def matches(self, name: str, port: int) -> bool:
        return port in self.ports and self.domain.matches_name(name)

    def __str__(self) -> str:
        port = "" if self.ports == DEFAULT_PORTS else f":{self.ports[0]}"
        return f"{self.domain.pattern}{port}"


def _host(text: object) -> SecretHost:
    if not isinstance(text, str) or not text:
        raise ConfigError(f"a secret's host is a name such as 'api.example.com', got {text!r:.60}")
    name, sep, port = text.rpartition(":") if ":" in text else (text, "", "")
    ports: tuple[int, ...] = DEFAULT_PORTS
    if sep:
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ConfigError(f"invalid port in the secret host {text!r}")
        ports = (int(port),)
    return SecretHost(Domain(name), ports)


@dataclass(frozen=True)
class Secret:
    """A credential bound to hosts. ``repr()``, ``str()`` and pickling never show :attr:`value`."""

    name: str
    value: str = field(repr=False)
    hosts: tuple[SecretHost, ...]
    allow_http: bool = False
    prefix: str = ""
    header: str | None = None  # set: sent as this request header, no placeholder in the guest

    def __repr__(self) -> str:
        hosts = ", ".join(str(h) for h in self.hosts)
        header = "" if self.header is None else f", header={self.header!r}"
        return (
            f"Secret({self.name!r}, value=<hidden>, hosts=[{hosts}], allow_http={self.allow_http}"
            f"{header})"
        )

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("a capsa Secret is not pickled: its value stays in the process that made it")

    def bound_to(self, name: str, port: int) -> bool:
        return any(host.matches(name, port) for host in self.hosts)

    def new_placeholder(self) -> str:
        """``prefix`` + random base62, as long as the value (at least 40 random characters)."""
        size = max(MIN_RANDOM, min(len(self.value), MAX_PLACEHOLDER) - len(self.prefix))
        return self.prefix + "".join(_random.choice(_ALPHABET) for _ in range(size))


def check_header_name(header: object) -> str:
    """A header a secret may set: an HTTP token that does not frame or route the request."""
    if not isinstance(header, str) or not _HEADER.fullmatch(header):
        raise ConfigError(
            f"a header name is an HTTP token (letters, digits, !#$%&'*+-.^_`|~), got {header!r:.60}"
        )
    if header.lower() in FRAMING_HEADERS:
        raise ConfigError(
            f"a secret cannot set the {header} header: it frames or routes the request",
            hint="secrets set credentials such as Authorization or X-Api-Key",
        )
    return header


def make_secret(
    name: str, value: str, hosts: list[str] | tuple[str, ...], *, allow_http: bool,
    prefix: str | None, header: str | None = None,
) -> Secret:  # fmt: skip
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(f"a secret's name is an environment variable name, got {name!r:.60}")
    if not isinstance(value, str) or not value or len(value) > MAX_VALUE:
        raise ConfigError(
            f"the value of secret {name} must be a non-empty string of at most {MAX_VALUE}"
        )
    if any(not 0x20 <= ord(c) < 0x7F for c in value):
        raise ConfigError(
            f"the value of secret {name} has characters that cannot go in an HTTP header",
            hint="a secret's value is printable ASCII (no newline, no control characters)",
        )
    if isinstance(hosts, str) or not isinstance(hosts, list | tuple) or not hosts:
        raise ConfigError(
            f"secret {name} needs a non-empty list of hosts",
            hint="hosts=['api.example.com'] (or '*.example.com', 'host:8443'): where it may be sent",
        )
    if header is not None:
        check_header_name(header)
        if prefix is not None:
            raise ConfigError(f"secret {name} is sent as a header: it has no placeholder to prefix")
        prefix = ""
    elif prefix is None:
        prefix = next((p for p in KNOWN_PREFIXES if value.startswith(p) and len(value) > len(p)), "")
    elif (
        not isinstance(prefix, str) or len(prefix) > 32 or any(c not in _ALPHABET + "-_" for c in prefix)
    ):
        raise ConfigError("a placeholder prefix is at most 32 letters, digits, '-' or '_'")
    return Secret(name, value, tuple(_host(h) for h in hosts), bool(allow_http), prefix, header)


def check_secrets(secrets: tuple[Secret, ...], policy: NetworkPolicy) -> None:
    """Refuse a secret whose host the policy denies (it could never be used): at build."""
    for secret in secrets:
        for host in secret.hosts:
            name = f"capsa-probe.{host.domain.base}" if host.domain.wildcard else host.domain.base
            if not policy.decide_name(name).allowed:
                raise ConfigError(
                    f"secret {secret.name} is bound to {host}, which the network policy denies",
                    hint="allow the host in the policy (allow_domain) or bind the secret elsewhere",
                )


class SecretSession:
    """One sandbox's side of its secrets: a placeholder per secret and the CA whose certificates
    the gateway presents for the bound hosts. Forks share their parent's session (their processes
    hold the parent's placeholders and trust its CA); every other sandbox gets a new one."""

    def __init__(self, secrets: tuple[Secret, ...]) -> None:
        self.secrets = secrets
        self.placeholders = {s.name: s.new_placeholder() for s in secrets if s.header is None}
        self.ca = SandboxCA([h.domain for s in secrets for h in s.hosts])
        self.guest_bundle: str | None = None  # where the guest's CA bundle is, once installed

    def covers(self, secret: Secret) -> bool:
        """Whether this session's CA may sign for every host of ``secret`` (made for the hosts
        bound when the sandbox was built or restored)."""
        return all(self.ca.permits(host.domain) for host in secret.hosts)

    def set_headers(self, headers: tuple[Secret, ...]) -> None:
        """Replace the header secrets (``Gateway.secret(header=...)``), live: the proxy applies the
        new ones from the next request. Placeholder secrets stay (the guest holds their
        placeholders). Each host must be one the CA covers (:meth:`covers`)."""
        for secret in headers:
            if secret.header is None:
                raise ConfigError(f"secret {secret.name} is no header secret: it cannot be replaced")
            if not self.covers(secret):
                hosts = ", ".join(str(h) for h in secret.hosts)
                raise ConfigError(
                    f"secret {secret.name} is bound to {hosts}, which this sandbox's CA was not made "
                    "for",
                    hint="a host's headers can be changed live only if it had a secret at build",
                )
        self.secrets = tuple(s for s in self.secrets if s.header is None) + tuple(headers)

    def environment(self) -> dict[str, str]:
        return dict(self.placeholders)

    def intercepts(self, names: frozenset[str], port: int) -> bool:
        """Whether a flow to a destination resolved for ``names`` on ``port`` goes through the proxy."""
        return any(s.bound_to(n, port) for s in self.secrets for n in names)

    def bound(self, name: str, port: int) -> bool:
        return any(s.bound_to(name, port) for s in self.secrets)

    def __repr__(self) -> str:
        return f"SecretSession({[s.name for s in self.secrets]})"
