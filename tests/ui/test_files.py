"""The dashboard's file browser (issue 29) against a real ``capsa serve``: list, download and upload
through its routes, an upload read back through the E2B SDK (owned by the sandbox's default user),
and what it refuses: no session, no or a wrong CSRF token, another tenant's sandbox, a file name
that leaves the directory, an upload over the cap."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import pytest

e2b = pytest.importorskip("e2b")

from tests.server.conftest import Server  # noqa: E402
from tests.ui.conftest import ALICE, BOB  # noqa: E402
from tests.ui.termfiles import COOKIE, csrf, login  # noqa: E402

pytestmark = [pytest.mark.vm, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    """alpha's browser: its session cookie, and its CSRF token as a default header."""
    cookie = login(server, ALICE)
    headers = {"X-CSRF-Token": csrf(server, cookie)}
    with httpx.Client(
        base_url=server.url, cookies={COOKIE: cookie}, headers=headers, timeout=30
    ) as http:
        yield http


def _api(sbx: e2b.Sandbox) -> str:
    return f"/ui/api/sandboxes/{sbx.sandbox_id}/files"


def test_list_and_download(client: httpx.Client, sbx: e2b.Sandbox) -> None:
    sbx.files.write("/home/user/docs/report <1>.html", "<script>alert(1)</script>")
    home = client.get(_api(sbx))
    assert home.status_code == 200, home.text
    assert home.json()["path"] == "/home/user" and home.json()["parent"] == "/home"
    docs = {e["name"]: e for e in home.json()["entries"]}["docs"]
    assert docs["type"] == "dir"
    listing = client.get(_api(sbx), params={"path": "/home/user/docs"}).json()
    [entry] = listing["entries"]
    assert entry["name"] == "report <1>.html" and entry["type"] == "file" and entry["size"] == 25
    assert entry["mtime"].endswith("Z")
    got = client.get(f"{_api(sbx)}/download", params={"path": "/home/user/docs/report <1>.html"})
    assert got.status_code == 200 and got.content == b"<script>alert(1)</script>"
    assert got.headers["content-type"] == "application/octet-stream"
    assert got.headers["content-disposition"].startswith('attachment; filename="report <1>.html"')
    assert "filename*=UTF-8''report%20%3C1%3E.html" in got.headers["content-disposition"]
    assert got.headers["x-content-type-options"] == "nosniff"
    assert "sandbox" in got.headers.get_list("content-security-policy")[0]
    assert client.get(f"{_api(sbx)}/download", params={"path": "/home/user/docs"}).status_code == 400
    assert client.get(f"{_api(sbx)}/download", params={"path": "/nope"}).status_code == 404
    assert (
        client.get(_api(sbx), params={"path": "/home/user/docs/../../../etc"}).json()["path"] == "/etc"
    )


def test_uploads_are_the_default_users_and_readable_through_the_sdk(
    client: httpx.Client, sbx: e2b.Sandbox
) -> None:
    files = [("file", ("a.txt", b"first")), ("file", ("b.bin", bytes(range(256))))]
    reply = client.post(_api(sbx), params={"path": "/home/user/up"}, files=files)
    assert reply.status_code == 200, reply.text
    assert reply.json() == {"written": ["/home/user/up/a.txt", "/home/user/up/b.bin"]}
    assert sbx.files.read("/home/user/up/a.txt") == "first"
    assert bytes(sbx.files.read("/home/user/up/b.bin", format="bytes")) == bytes(range(256))
    assert sbx.files.get_info("/home/user/up/a.txt").owner == "user"
    raw = client.post(_api(sbx), params={"path": "raw.txt"}, content=b"raw body")
    assert raw.json() == {"written": ["/home/user/raw.txt"]}
    assert sbx.files.read("/home/user/raw.txt") == "raw body"


def test_refused_requests(server: Server, client: httpx.Client, sbx: e2b.Sandbox) -> None:
    target = {"path": "/home/user/refused.txt"}
    no_csrf = httpx.post(
        server.url + _api(sbx), params=target, content=b"x", cookies={COOKIE: client.cookies[COOKIE]}
    )
    assert no_csrf.status_code == 403
    wrong = client.post(_api(sbx), params=target, content=b"x", headers={"X-CSRF-Token": "forged"})
    assert wrong.status_code == 403
    assert httpx.get(server.url + _api(sbx), timeout=10).status_code == 401
    assert not sbx.files.exists("/home/user/refused.txt")
    # another tenant's session: the sandbox does not exist for it
    cookie = login(server, BOB)
    beta = {COOKIE: cookie}
    beta_csrf = {"X-CSRF-Token": csrf(server, cookie)}
    assert httpx.get(server.url + _api(sbx), cookies=beta).status_code == 404
    stolen = httpx.get(
        f"{server.url}{_api(sbx)}/download", params={"path": "/etc/hostname"}, cookies=beta
    )
    assert stolen.status_code == 404
    put = httpx.post(
        server.url + _api(sbx), params=target, content=b"x", cookies=beta, headers=beta_csrf
    )
    assert put.status_code == 404
    # names that would leave the upload's directory, and a sandbox id that is a path
    for name in ("../evil.txt", "sub/evil.txt", "..", "a\\b", " "):
        bad = client.post(_api(sbx), params={"path": "/home/user/up"}, files=[("file", (name, b"x"))])
        assert bad.status_code == 400, (name, bad.text)
    assert not sbx.files.exists("/home/user/evil.txt")
    assert client.get("/ui/api/sandboxes/..%2F..%2Fsandboxes/files").status_code == 404
    assert client.get(_api(sbx), params={"path": "/etc/\x00"}).status_code == 400


def test_an_upload_over_the_cap_is_refused(
    server: Server, client: httpx.Client, sbx: e2b.Sandbox
) -> None:
    """A body declared larger than the server's ``max_upload_bytes`` (1 GiB here) is refused before
    a byte of it is read (the streamed count, for a body without a length: tests/unit)."""
    host, port = server.url.removeprefix("http://").split(":")
    head = (
        f"POST {_api(sbx)}?path=/home/user/big.bin HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Cookie: {COOKIE}={client.cookies[COOKIE]}\r\nX-CSRF-Token: {client.headers['X-CSRF-Token']}\r\n"
        f"Content-Length: {(1 << 30) + 1}\r\nContent-Type: application/octet-stream\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(head.encode() + b"x" * 1024)
        reply = conn.recv(4096)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert not sbx.files.exists("/home/user/big.bin")
