"""Dashboard sessions (no VM): the cookie is signed, expires and names a live session; the CSRF
token is checked; the login redirect stays on the dashboard."""

from __future__ import annotations

import pytest
from starlette.requests import Request
from starlette.responses import Response

from capsa.server.api_error import ApiError
from capsa.server.tenants import ApiKey, KeyRing
from capsa.server.ui.pages import safe_next
from capsa.server.ui.session import COOKIE, MAX_SESSIONS, Sessions, require_csrf

ALICE = "alice-key-0123456789"
ADMIN = "admin-key-0123456789"
KEYS = KeyRing((ApiKey(ALICE, "alice"), ApiKey(ADMIN, "default", admin=True)))


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def request(cookie: str | None = None, csrf: str | None = None) -> Request:
    headers = []
    if cookie is not None:
        headers.append((b"cookie", f"{COOKIE}={cookie}".encode()))
    if csrf is not None:
        headers.append((b"x-csrf-token", csrf.encode()))
    return Request({"type": "http", "method": "POST", "path": "/ui/", "headers": headers})


def test_login_gives_a_session_of_the_keys_tenant() -> None:
    sessions = Sessions(KEYS)
    cookie = sessions.login(ALICE)
    assert cookie is not None
    session = sessions.session_of(request(cookie))
    assert session is not None
    assert session.principal.tenant == "alice" and session.principal.scope == "alice"
    admin = sessions.session_of(request(sessions.login(ADMIN)))
    assert admin is not None and admin.principal.scope is None
    assert session.csrf != admin.csrf and len(session.csrf) >= 32


def test_a_wrong_key_gets_no_session() -> None:
    sessions = Sessions(KEYS)
    assert sessions.login("not-a-key") is None
    assert sessions.login("") is None
    assert len(sessions) == 0


def test_forged_and_altered_cookies_are_refused() -> None:
    sessions = Sessions(KEYS)
    cookie = sessions.login(ALICE)
    assert cookie is not None
    sid, expires, signature = cookie.split(".")
    other = Sessions(KEYS)  # another server: another signing key
    forged = [
        f"{sid}.{expires}.{'0' * 64}",
        f"{sid}.{int(expires) + 3600}.{signature}",  # a later expiry, the old signature
        f"{sid[:-1]}{'B' if sid.endswith('A') else 'A'}.{expires}.{signature}",  # one character changed
        f"{sid}.{expires}",
        "",
        "x" * 5000,
        other.login(ALICE) or "",
    ]
    for value in forged:
        assert sessions.session_of(request(value)) is None, value
    assert sessions.session_of(request()) is None


def test_a_session_expires() -> None:
    clock = Clock()
    sessions = Sessions(KEYS, ttl=60, now=clock)
    cookie = sessions.login(ALICE)
    assert sessions.session_of(request(cookie)) is not None
    clock.now += 59
    assert sessions.session_of(request(cookie)) is not None
    clock.now += 2
    assert sessions.session_of(request(cookie)) is None
    assert len(sessions) == 0  # and it is forgotten


def test_logout_ends_the_session_even_with_its_cookie_kept() -> None:
    sessions = Sessions(KEYS)
    cookie = sessions.login(ALICE)
    session = sessions.session_of(request(cookie))
    assert session is not None
    sessions.logout(session)
    assert sessions.session_of(request(cookie)) is None


def test_sessions_are_bounded() -> None:
    sessions = Sessions(KEYS)
    first = sessions.login(ALICE)
    for _ in range(MAX_SESSIONS):
        sessions.login(ALICE)
    assert len(sessions) == MAX_SESSIONS
    assert sessions.session_of(request(first)) is None  # the oldest went first


def test_csrf_token_is_required() -> None:
    sessions = Sessions(KEYS)
    cookie = sessions.login(ALICE)
    session = sessions.session_of(request(cookie))
    assert session is not None
    require_csrf(request(cookie, session.csrf), session)
    for wrong in (None, "", session.csrf[:-1], session.csrf + "x"):
        with pytest.raises(ApiError) as caught:
            require_csrf(request(cookie, wrong), session)
        assert caught.value.status == 403
    other = sessions.session_of(request(sessions.login(ALICE)))
    assert other is not None
    with pytest.raises(ApiError):  # another session's token
        require_csrf(request(cookie, other.csrf), session)


@pytest.mark.parametrize("secure", [False, True])
def test_cookie_flags(secure: bool) -> None:
    sessions = Sessions(KEYS, ttl=3600, secure=secure)
    response = Response()
    sessions.set_cookie(response, sessions.login(ALICE) or "")
    header = response.headers["set-cookie"]
    assert "HttpOnly" in header and "SameSite=strict" in header and "Max-Age=3600" in header
    assert "Path=/ui" in header
    assert ("Secure" in header) is secure


def test_require_without_a_session_is_401() -> None:
    with pytest.raises(ApiError) as caught:
        Sessions(KEYS).require(request())
    assert caught.value.status == 401


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/ui/server", "/ui/server"),
        ("/ui/sandboxes/abc", "/ui/sandboxes/abc"),
        ("https://evil.example/", "/ui/"),
        ("//evil.example/ui/", "/ui/"),
        ("/ui/\\evil", "/ui/"),
        ("/metrics", "/ui/"),
    ],
)
def test_login_redirect_stays_on_the_dashboard(target: str, expected: str) -> None:
    assert safe_next(target) == expected
