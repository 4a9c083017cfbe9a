"""Which guest account an envd request acts as, as E2B's envd decides it.

The SDKs name the account per call (``user="root"``): in the ``Authorization: Basic`` header
(``base64("name:")``) of Connect calls, in the ``username`` query parameter of ``/files``. Without one,
envd uses the template's default user, ``user`` in E2B's images and in capsa's default image
(``capsa image build`` makes it: uid 1000, home /home/user, passwordless sudo). A sandbox on an image
without that account (an imported OCI image) falls back to the agent's default, root or the image's
``User``, so that it keeps working; an account the SDK named explicitly is never substituted.

The server only forwards the name: the guest agent resolves it from the guest's own /etc/passwd, so
a name the guest lacks is refused there and answered as envd answers it
(``unauthenticated: invalid username: 'x'``).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Awaitable, Callable
from typing import TypeVar

from capsa.errors import UnknownUserError
from capsa.server.connect import ConnectError

DEFAULT_USER = "user"
DEFAULT_HOME = "/home/user"
MAX_NAME = 256

T = TypeVar("T")


def _checked(name: str) -> str:
    if not name or len(name) > MAX_NAME or not name.isprintable() or "/" in name:
        raise ConnectError("unauthenticated", f"invalid username: {name[:80]!r}")
    return name


def from_authorization(header: str | None) -> str | None:
    """The account a Connect call names (``Authorization: Basic base64("name:")``), or None."""
    if header is None or header[:6].lower() != "basic ":
        return None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise ConnectError("unauthenticated", "malformed Basic authorization header") from None
    return _checked(decoded.partition(":")[0])


def from_query(value: str | None) -> str | None:
    """The account a ``/files`` request names (its ``username`` parameter), or None."""
    return None if not value else _checked(value)


def home_of(user: str | None) -> str:
    """Where relative paths of ``user`` start: its home, as envd resolves them (root's is /root;
    any other account's is taken to be /home/<name>, as ``useradd -m`` makes it)."""
    if user is None or user == DEFAULT_USER:
        return DEFAULT_HOME
    return "/root" if user == "root" else f"/home/{user}"


def unknown_user(exc: UnknownUserError) -> ConnectError:
    return ConnectError("unauthenticated", f"invalid username: '{exc.user[:80]}'")


async def as_account(requested: str | None, call: Callable[[str | None], Awaitable[T]]) -> T:
    """``call(requested)``; with no account requested, ``call("user")``, or ``call(None)`` (the
    agent's default) where the guest has no account ``user``."""
    if requested is not None:
        return await call(requested)
    try:
        return await call(DEFAULT_USER)
    except UnknownUserError:
        return await call(None)
