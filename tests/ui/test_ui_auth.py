"""Who may use the dashboard, without a browser: against the real server, every ``/ui`` page and
API refuses a request without a session, with a forged, altered or ended cookie, or (for what
changes state) without the session's CSRF token; and a tenant's session never sees, streams or
acts on another tenant's sandbox."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.ui.conftest import UiServer

pytestmark = pytest.mark.vm  # the shared server boots its pool's guests

STATE_CHANGING = ("kill", "pause", "resume", "extend")


def login(server: UiServer, tenant: str) -> tuple[httpx.Client, str]:
    """A client holding ``tenant``'s session cookie, and the session's CSRF token."""
    client = httpx.Client(base_url=server.url, timeout=30)
    reply = client.post("/ui/login", data={"api_key": server.keys[tenant]})
    assert reply.status_code == 303, reply.text
    cookie = reply.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Max-Age=" in cookie
    assert "Secure" not in cookie  # plain HTTP here; --tls makes it Secure (tests/unit)
    page = client.get("/ui/server")
    token = re.search(r'<meta name="csrf-token" content="([^"]+)"', page.text)
    assert token is not None
    return client, token.group(1)


def first_event(client: httpx.Client, path: str) -> tuple[str, Any]:
    """The first event of a dashboard stream (then the stream is closed)."""
    with client.stream("GET", path) as reply:
        assert reply.status_code == 200, reply.read()
        assert reply.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in reply.iter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: ") and event is not None:
                return event, json.loads(line.removeprefix("data: "))
    raise AssertionError(f"{path}: the stream ended without an event")


@pytest.fixture(scope="module")
def alice(ui_server: UiServer) -> Iterator[tuple[httpx.Client, str]]:
    client, token = login(ui_server, "alice")
    try:
        yield client, token
    finally:
        client.close()


def test_without_a_session_pages_redirect_and_apis_refuse(ui_server: UiServer) -> None:
    with httpx.Client(base_url=ui_server.url, timeout=30) as anonymous:
        for path in ("/ui/", "/ui/server", "/ui/sandboxes/i0123"):
            reply = anonymous.get(path)
            assert reply.status_code == 303, path
            assert reply.headers["location"].startswith("/ui/login")
        for path in ("/ui/api/events", "/ui/api/server", "/ui/api/sandboxes/i0123/events"):
            assert anonymous.get(path).status_code == 401, path
        for action in STATE_CHANGING:
            assert anonymous.post(f"/ui/api/sandboxes/i0123/{action}").status_code == 401
        # an API key is no session: /ui authenticates by the cookie alone
        keyed = anonymous.get("/ui/api/server", headers={"X-API-KEY": ui_server.keys["admin"]})
        assert keyed.status_code == 401
        assert anonymous.get("/ui/login").status_code == 200  # the one page open to all


def test_a_wrong_key_does_not_log_in(ui_server: UiServer) -> None:
    with httpx.Client(base_url=ui_server.url, timeout=30) as client:
        reply = client.post("/ui/login", data={"api_key": "not-a-key"})
        assert reply.status_code == 401
        assert "set-cookie" not in reply.headers
        assert "not accepted" in reply.text


def test_forged_and_altered_cookies_are_refused(
    ui_server: UiServer, alice: tuple[httpx.Client, str]
) -> None:
    client, _ = alice
    good = client.cookies["capsa_ui"]
    sid, expires, signature = good.split(".")
    forged = {
        "signature": f"{sid}.{expires}.{'ab' * 32}",
        "later expiry": f"{sid}.{int(expires) + 86400}.{signature}",
        "expired": f"{sid}.{int(expires) - 13 * 3600}.{signature}",
        "other sid": f"{'A' * len(sid)}.{expires}.{signature}",
        "garbage": "x" * 300,
    }
    with httpx.Client(base_url=ui_server.url, timeout=30) as other:
        for what, value in forged.items():
            other.cookies.set("capsa_ui", value, path="/ui")
            assert other.get("/ui/api/server").status_code == 401, what
            assert other.get("/ui/").status_code == 303, what
        other.cookies.set("capsa_ui", good, path="/ui")  # the real one works from anywhere
        assert other.get("/ui/api/server").status_code == 200


def test_logout_ends_the_session(ui_server: UiServer) -> None:
    client, token = login(ui_server, "bob")
    cookie = client.cookies["capsa_ui"]
    try:
        assert client.post("/ui/logout").status_code == 403  # no CSRF token
        assert client.post("/ui/logout", headers={"X-CSRF-Token": token}).status_code == 204
    finally:
        client.close()
    with httpx.Client(base_url=ui_server.url, timeout=30) as replay:
        replay.cookies.set("capsa_ui", cookie, path="/ui")
        assert replay.get("/ui/api/server").status_code == 401


def test_security_headers(alice: tuple[httpx.Client, str]) -> None:
    client, _ = alice
    reply = client.get("/ui/")
    assert reply.status_code == 200
    assert "default-src 'self'" in reply.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in reply.headers["content-security-policy"]
    assert reply.headers["x-frame-options"] == "DENY"
    assert reply.headers["cache-control"] == "no-store"


@pytest.mark.timeout(240)
def test_csrf_and_tenant_isolation(ui_server: UiServer, alice: tuple[httpx.Client, str]) -> None:
    from e2b import Sandbox

    client, token = alice
    bob, bob_token = login(ui_server, "bob")
    admin, _ = login(ui_server, "admin")
    sandbox = Sandbox.create(
        timeout=120, metadata={"case": "isolation"}, **ui_server.sdk(ui_server.keys["alice"])
    )
    try:
        sid = sandbox.sandbox_id
        # a missing or wrong CSRF token: 403, and the sandbox lives on
        for headers in ({}, {"X-CSRF-Token": "wrong"}, {"X-CSRF-Token": bob_token}):
            for action in STATE_CHANGING:
                reply = client.post(f"/ui/api/sandboxes/{sid}/{action}", headers=headers)
                assert reply.status_code == 403, (action, headers, reply.text)
        assert sandbox.is_running()
        # bob: not in his list, no page, no stream, no action (404 as for an unknown id)
        _, listed = first_event(bob, "/ui/api/events")
        assert sid not in {row["id"] for row in listed["sandboxes"]}
        assert bob.get(f"/ui/sandboxes/{sid}").status_code == 404
        assert bob.get(f"/ui/api/sandboxes/{sid}/events").status_code == 404
        assert bob.get(f"/ui/api/sandboxes/{sid}/processes").status_code == 404
        for action in STATE_CHANGING:
            reply = bob.post(f"/ui/api/sandboxes/{sid}/{action}", headers={"X-CSRF-Token": bob_token})
            assert reply.status_code == 404, (action, reply.text)
        assert sandbox.is_running()
        # alice sees it, with its tenant; the admin sees it too
        _, listed = first_event(client, "/ui/api/events")
        rows = {row["id"]: row for row in listed["sandboxes"]}
        assert rows[sid]["tenant"] == "alice" and rows[sid]["metadata"] == {"case": "isolation"}
        _, everyone = first_event(admin, "/ui/api/events")
        assert sid in {row["id"] for row in everyone["sandboxes"]}
        # the filters are the control plane's
        _, filtered = first_event(client, "/ui/api/events?metadata=case%3Dother")
        assert filtered["sandboxes"] == []
        assert client.get("/ui/api/events?state=nonsense").status_code == 400
        event, view = first_event(client, f"/ui/api/sandboxes/{sid}/events")
        assert event == "sandbox" and view["id"] == sid
        # with the token the action works
        reply = client.post(
            f"/ui/api/sandboxes/{sid}/extend", headers={"X-CSRF-Token": token}, json={"seconds": 60}
        )
        assert reply.status_code == 200 and reply.json()["end"] > view["end"]
        processes = client.get(f"/ui/api/sandboxes/{sid}/processes").json()["processes"]
        assert any("capsa-agent" in p["command"] for p in processes)
    finally:
        sandbox.kill()
        bob.close()
        admin.close()


def test_another_sites_form_cannot_log_the_browser_in(ui_server: UiServer) -> None:
    with httpx.Client(base_url=ui_server.url, timeout=30) as client:
        reply = client.post(
            "/ui/login",
            data={"api_key": ui_server.keys["bob"]},
            headers={"Origin": "https://evil.example"},
        )
        assert reply.status_code == 403 and "set-cookie" not in reply.headers
        same = client.post(
            "/ui/login", data={"api_key": ui_server.keys["bob"]}, headers={"Origin": ui_server.url}
        )
        assert same.status_code == 303
