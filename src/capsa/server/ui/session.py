"""Dashboard sessions: an API key typed once into the login page becomes a cookie.

The cookie names a server-side session (so logging out ends it) and is signed with a key drawn
at random when the server starts (HMAC-SHA256), so a forged or altered cookie is refused before
any lookup, and every session ends with the server. It expires (``ttl``), is ``HttpOnly`` (no
script reads it), ``SameSite=Strict`` (no other site's page sends it) and ``Secure`` when served
over TLS. State-changing requests also carry the session's CSRF token in ``X-CSRF-Token``: a
second line of defence should a browser ignore ``SameSite``."""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from starlette.requests import HTTPConnection
from starlette.responses import Response

from capsa.server.api_error import ApiError
from capsa.server.tenants import KeyRing, Principal

log = logging.getLogger(__name__)

COOKIE = "capsa_ui"
CSRF_HEADER = "x-csrf-token"
DEFAULT_TTL = 12 * 3600.0  # seconds a session lasts from its login
MAX_SESSIONS = 10_000  # live sessions kept; the oldest goes first beyond
_MAX_COOKIE = 256  # characters: a longer cookie is not one of ours


@dataclass(frozen=True)
class UiSession:
    """A logged-in browser: who it acts for, its CSRF token and when it ends (unix seconds)."""

    sid: str
    principal: Principal
    csrf: str
    expires: float


class Sessions:
    """Creates, finds and ends sessions. ``now`` is injectable for the expiry tests."""

    def __init__(
        self,
        keys: KeyRing,
        *,
        ttl: float = DEFAULT_TTL,
        secure: bool = False,
        now: Callable[[], float] = time.time,
    ) -> None:
        self._keys = keys
        self._secret = secrets.token_bytes(32)
        self.ttl = ttl
        self.secure = secure  # served over TLS: the cookie is Secure
        self._now = now
        self._live: dict[str, UiSession] = {}

    def login(self, api_key: str) -> str | None:
        """The cookie value of a new session for ``api_key``, None if the key is not accepted."""
        principal = self._keys.principal(api_key)
        if principal is None:
            return None
        self._prune()
        sid = secrets.token_urlsafe(24)
        expires = int(self._now() + self.ttl)
        self._live[sid] = UiSession(sid, principal, secrets.token_urlsafe(32), expires)
        log.info("dashboard login: tenant %s%s", principal.tenant, " (admin)" if principal.admin else "")
        return f"{sid}.{expires}.{self._sign(sid, expires)}"

    def session_of(self, conn: HTTPConnection) -> UiSession | None:
        """The live session a request or WebSocket's cookie names; None if it has none, or a
        forged, altered, expired or ended one."""
        value = conn.cookies.get(COOKIE)
        if value is None or len(value) > _MAX_COOKIE:
            return None
        parts = value.split(".")
        if len(parts) != 3 or not parts[1].isdigit():
            return None
        sid, expires, signature = parts[0], int(parts[1]), parts[2]
        if not hmac.compare_digest(signature, self._sign(sid, expires)):
            return None
        session = self._live.get(sid)
        if session is None or session.expires != expires:
            return None
        if self._now() >= expires:
            self._live.pop(sid, None)
            return None
        return session

    def require(self, conn: HTTPConnection) -> UiSession:
        """The request's session; without one, 401 (what ``/ui/api`` routes answer)."""
        session = self.session_of(conn)
        if session is None:
            raise ApiError(401, "not logged in (no or an expired session)", hint="log in at /ui/login")
        return session

    def logout(self, session: UiSession) -> None:
        self._live.pop(session.sid, None)

    def set_cookie(self, response: Response, value: str) -> None:
        response.set_cookie(
            COOKIE,
            value,
            max_age=int(self.ttl),
            path="/ui",
            httponly=True,
            samesite="strict",
            secure=self.secure,
        )

    def clear_cookie(self, response: Response) -> None:
        response.delete_cookie(COOKIE, path="/ui", httponly=True, samesite="strict", secure=self.secure)

    def __len__(self) -> int:
        return len(self._live)

    def _sign(self, sid: str, expires: int) -> str:
        mac = hmac.new(self._secret, f"{sid}.{expires}".encode(), hashlib.sha256)
        return mac.hexdigest()

    def _prune(self) -> None:
        now = self._now()
        for sid in [s for s, v in self._live.items() if v.expires <= now]:
            del self._live[sid]
        while len(self._live) >= MAX_SESSIONS:  # dicts keep insertion order: the oldest first
            del self._live[next(iter(self._live))]


def require_csrf(conn: HTTPConnection, session: UiSession) -> None:
    """Refuse (403) a state-changing request whose ``X-CSRF-Token`` is not its session's."""
    token = conn.headers.get(CSRF_HEADER, "")
    if not hmac.compare_digest(token.encode(), session.csrf.encode()):
        raise ApiError(403, "missing or wrong CSRF token", hint="reload the page")
