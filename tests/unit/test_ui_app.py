"""The dashboard's mounting in ``capsa serve`` (in-process, no VM): ``--no-ui`` removes it, TLS
makes its cookie Secure, ``/ui`` is authenticated by the session cookie and never by an API key,
and the API is never authenticated by the cookie."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from starlette.testclient import TestClient

from capsa.server.app import ServerConfig, create_app
from capsa.server.tenants import KeyRing

KEY = "unit-ui-key-0123456789"


def client(**config: object) -> Iterator[TestClient]:
    server = create_app(ServerConfig(api_keys=KeyRing.single(KEY), metrics_interval=0, **config))  # type: ignore[arg-type]
    with TestClient(server.app, base_url="http://127.0.0.1") as test_client:
        yield test_client


@pytest.fixture
def ui() -> Iterator[TestClient]:
    yield from client()


def test_no_ui_serves_no_dashboard() -> None:
    for test_client in client(ui=False):
        assert test_client.get("/ui/login").status_code == 401  # not a route: the API's refusal
        reply = test_client.get("/ui/login", headers={"X-API-KEY": KEY})
        assert reply.status_code == 404
        assert test_client.post("/ui/login", data={"api_key": KEY}).status_code in (401, 404)


def test_tls_makes_the_cookie_secure() -> None:
    for test_client in client(tls=True):
        reply = test_client.post("/ui/login", data={"api_key": KEY}, follow_redirects=False)
        assert reply.status_code == 303
        assert "Secure" in reply.headers["set-cookie"]


def test_the_api_ignores_the_session_cookie(ui: TestClient) -> None:
    assert ui.post("/ui/login", data={"api_key": KEY}, follow_redirects=False).status_code == 303
    assert ui.get("/ui/api/server").status_code == 200
    assert ui.get("/sandboxes").status_code == 401  # the cookie is no API key
    assert ui.get("/ui/api/server", headers={"X-API-KEY": "wrong"}).status_code == 200


def test_login_page_and_assets_need_no_session(ui: TestClient) -> None:
    assert ui.get("/ui/login").status_code == 200
    for asset in ("ui.js", "ui.css", "list.js", "sandbox.js", "server.js"):
        reply = ui.get(f"/ui/static/{asset}")
        assert reply.status_code == 200, asset
    assert ui.get("/ui/static/../app.py").status_code == 404


def test_an_oversized_login_body_is_refused(ui: TestClient) -> None:
    reply = ui.post("/ui/login", content=b"api_key=" + b"x" * (2 << 20),
                    headers={"content-type": "application/x-www-form-urlencoded"})  # fmt: skip
    assert reply.status_code == 413
