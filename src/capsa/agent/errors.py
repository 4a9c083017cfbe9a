"""Turn the agent's error replies into capsa exceptions, and check guest paths before sending them."""

from __future__ import annotations

import math
from typing import Any

from capsa.errors import (
    AgentError,
    CapsaError,
    ConfigError,
    GuestFileError,
    GuestFileExistsError,
    GuestFileNotFoundError,
    GuestPermissionError,
    ProtocolError,
    UnknownUserError,
)

MAX_PATH = 4096

_BY_KIND: dict[str, type[GuestFileError]] = {
    "not_found": GuestFileNotFoundError,
    "permission": GuestPermissionError,
    "exists": GuestFileExistsError,
}


def check_guest_path(path: str) -> str:
    if not isinstance(path, str) or not path.startswith("/"):
        raise ConfigError(f"guest paths must be absolute strings, got {path!r}")
    if "\0" in path or len(path.encode()) > MAX_PATH:
        raise ConfigError(f"invalid guest path {path[:80]!r} (NUL byte or longer than {MAX_PATH})")
    return path


def check_timeout(value: object, what: str = "timeout") -> float:
    """A positive, finite number of seconds (a NaN or a negative one would expire at once or never)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise ConfigError(f"{what} must be a positive number of seconds, got {value!r:.40}")
    return float(value)


def check_user(user: object) -> str:
    """A guest account as the agent takes it: "name", "uid", "name:group" or "uid:gid" (the guest
    resolves it from its own /etc/passwd and /etc/group)."""
    if not isinstance(user, str) or not user or "\0" in user or len(user.encode()) > 256:
        raise ConfigError(f"invalid user {user!r:.80}")
    return user


def check_mode(mode: object) -> int:
    if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o7777:
        raise ConfigError(f"mode must be a permission number such as 0o644, got {mode!r:.40}")
    return mode


def agent_error(err: Any, what: str, path: str | None = None, *, user: str | None = None) -> CapsaError:
    """``err`` is the guest's ``err`` map (untrusted: every field is checked); ``user`` the
    account the request asked for, if any."""
    if not isinstance(err, dict):
        return ProtocolError(f"{what}: the agent sent a malformed error")
    kind = _text(err.get("kind")) or "os_error"
    msg = _text(err.get("msg")) or "error"
    errno = err.get("errno") if isinstance(err.get("errno"), int) else None
    guest_path = _text(err.get("path"))
    where = guest_path or path
    text = f"{what}: {msg}" + (f": {where}" if where else "")
    if kind == "unknown_user" and user is not None:
        return UnknownUserError(
            f"{what}: the guest has no account {user!r:.80}",
            user=user,
            hint="name an account of the guest's /etc/passwd (root always exists), or create it in "
            "the image (useradd)",
        )
    if kind == "bad_request":
        return AgentError(text, kind=kind, hint="this is a capsa bug or a capsa/agent version mismatch")
    if where is None:
        return AgentError(text, kind=kind, errno=errno)
    cls = _BY_KIND.get(kind, GuestFileError)
    return cls(text, path=where, kind=kind, errno=errno)


def _text(value: Any) -> str | None:
    return value[:500] if isinstance(value, str) else None


def expect_ok(
    reply: Any, what: str, path: str | None = None, *, user: str | None = None
) -> dict[str, Any]:
    if not isinstance(reply, dict):
        raise ProtocolError(f"{what}: the agent sent a malformed reply")
    if not reply.get("ok"):
        raise agent_error(reply.get("err"), what, path, user=user)
    return reply
