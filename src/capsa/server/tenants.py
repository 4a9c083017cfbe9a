"""API keys and the tenants they belong to (``capsa serve --api-key-file``).

Every sandbox belongs to the tenant of the key that created it; a key sees and manages only its
tenant's sandboxes (others' answer 404, exactly like unknown ids), except an ``admin`` key, which
sees all. The key file has one key per line::

    # comments and blank lines are ignored
    KEY                                   # tenant "default" (what a plain key always meant)
    KEY tenant=NAME [admin] [max_sandboxes=N] [creates_per_minute=N]

``max_sandboxes`` and ``creates_per_minute`` are the tenant's (several keys may share a tenant;
the values must then agree). ``CAPSA_API_KEY`` is one more key: tenant ``default``, admin (the
operator's own)."""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from capsa.errors import ConfigError
from capsa.server.quota import TenantLimits

log = logging.getLogger(__name__)

DEFAULT_TENANT = "default"
SHORT_KEY = 16  # characters: a shorter key is accepted with a warning
_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_KEY = re.compile(r"[\x21-\x7e]+")  # visible ASCII: it travels in an HTTP header
_LIMITS = ("max_sandboxes", "creates_per_minute")
_MAX_LIMIT = 1_000_000
KEY_FILE_HINT = (
    "one key per line: KEY, or KEY tenant=NAME [admin] [max_sandboxes=N] [creates_per_minute=N]"
)


@dataclass(frozen=True)
class Principal:
    """Who sent a request: its key's tenant, and whether the key may see every tenant's sandboxes."""

    tenant: str
    admin: bool = False

    @property
    def scope(self) -> str | None:
        """The tenant whose sandboxes this caller sees, None for all (an admin key)."""
        return None if self.admin else self.tenant


@dataclass(frozen=True)
class ApiKey:
    key: str = field(repr=False)
    tenant: str = DEFAULT_TENANT
    admin: bool = False


@dataclass(frozen=True)
class KeyRing:
    """The accepted keys and the tenants' limits."""

    keys: tuple[ApiKey, ...]
    limits: Mapping[str, TenantLimits] = field(default_factory=dict)
    _digests: tuple[bytes, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        digests = tuple(hashlib.sha256(k.key.encode()).digest() for k in self.keys)
        object.__setattr__(self, "_digests", digests)

    @classmethod
    def single(cls, key: str) -> KeyRing:
        """One admin key of the default tenant (no limits): the one-key server."""
        return cls((ApiKey(key, DEFAULT_TENANT, admin=True),))

    def principal(self, presented: str | None) -> Principal | None:
        """The caller a presented key stands for, None for no or an unknown key. Compares with
        every key (digests, so lengths do not matter) whichever matches: no timing oracle."""
        if presented is None:
            return None
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        found: ApiKey | None = None
        for key, known in zip(self.keys, self._digests, strict=True):
            if secrets.compare_digest(digest, known):
                found = key
        return None if found is None else Principal(found.tenant, found.admin)

    @property
    def tenants(self) -> list[str]:
        return sorted({k.tenant for k in self.keys})


def parse_key_file(text: str, source: str) -> tuple[list[tuple[int, ApiKey]], dict[str, TenantLimits]]:
    """The keys (with their line numbers) and the tenants' limits in a key file's ``text``;
    ConfigError naming ``source`` and the line for anything malformed, repeated or contradictory."""
    keys: list[tuple[int, ApiKey]] = []
    seen: dict[str, int] = {}
    limits: dict[str, dict[str, tuple[int, int]]] = {}  # tenant -> limit -> (value, line)
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source} line {number}"
        key, *options = line.split()
        if not _KEY.fullmatch(key):
            raise ConfigError(f"{where}: the key has characters other than visible ASCII")
        if key in seen:
            raise ConfigError(
                f"{where}: the same key as on line {seen[key]}",
                hint="every key must be unique (each names one tenant)",
            )
        seen[key] = number
        tenant, admin = DEFAULT_TENANT, False
        given: dict[str, int] = {}
        for option in options:
            name, sep, value = option.partition("=")
            if option == "admin":
                admin = True
            elif name == "tenant" and sep:
                if not _TENANT.fullmatch(value):
                    raise ConfigError(
                        f"{where}: bad tenant name {value!r}",
                        hint="1-64 characters: letters, digits, '_', '.', '-' (not first)",
                    )
                tenant = value
            elif name in _LIMITS and sep:
                if not value.isdigit() or not 1 <= int(value) <= _MAX_LIMIT:
                    raise ConfigError(f"{where}: {name} must be a number from 1 to {_MAX_LIMIT}")
                given[name] = int(value)
            else:
                raise ConfigError(f"{where}: unknown option {option!r}", hint=KEY_FILE_HINT)
        for limit, amount in given.items():
            earlier = limits.setdefault(tenant, {}).get(limit)
            if earlier is not None and earlier[0] != amount:
                raise ConfigError(
                    f"{where}: {limit}={amount} for tenant {tenant!r}, but line {earlier[1]} says "
                    f"{limit}={earlier[0]}",
                    hint="limits are the tenant's: give them once, or the same on every line",
                )
            limits[tenant][limit] = (amount, number)
        if len(key) < SHORT_KEY:
            log.warning("%s: a short key (%d characters); use %d or more", where, len(key), SHORT_KEY)
        keys.append((number, ApiKey(key, tenant, admin)))
    return keys, {
        tenant: TenantLimits(**{limit: amount for limit, (amount, _) in given_limits.items()})
        for tenant, given_limits in limits.items()
    }


def key_ring(
    file_keys: Iterable[ApiKey], limits: Mapping[str, TenantLimits], env_key: str | None
) -> KeyRing:
    """The ring of a key file's keys plus ``env_key`` (``CAPSA_API_KEY``: default tenant, admin)."""
    keys = list(file_keys)
    if env_key:
        if not _KEY.fullmatch(env_key):
            raise ConfigError("CAPSA_API_KEY has characters other than visible ASCII")
        if any(k.key == env_key for k in keys):
            raise ConfigError(
                "CAPSA_API_KEY is also in the API key file",
                hint="remove it from one of them: a key names one tenant",
            )
        if len(env_key) < SHORT_KEY:
            log.warning(
                "CAPSA_API_KEY: a short key (%d characters); use %d or more", len(env_key), SHORT_KEY
            )
        keys.append(ApiKey(env_key, DEFAULT_TENANT, admin=True))
    if not keys:
        raise ConfigError(
            "no API key configured",
            hint="set CAPSA_API_KEY or pass --api-key-file FILE (one key per line)",
        )
    return KeyRing(tuple(keys), dict(limits))
