"""The dashboard's file browser (issue 29) against a real ``capsa serve``: list, download and upload
through its routes, an upload read back through the E2B SDK (owned by the sandbox's default user),
and what it refuses: no session, no or a wrong CSRF token, another tenant's sandbox, a file name
that leaves the directory, an upload over the cap."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

e2b = pytest.importorskip("e2b")

from tests.server.conftest import Server  # noqa: E402
from tests.ui.termfiles import COOKIE, KEY_A, KEY_B, csrf, login, sdk, serve  # noqa: E402

pytestmark = [pytest.mark.vm, pytest.mark.timeout(120)]

MAX_UPLOAD_MB = 1


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from serve(tmp_path_factory.mktemp("ui-files"), "--max-upload-mb", str(MAX_UPLOAD_MB))


@pytest.fixture(scope="module")
def sbx(server: Server) -> Iterator[e2b.Sandbox]:
    sandbox = e2b.Sandbox.create(**sdk(server, KEY_A))
    try:
        yield sandbox
    finally:
        sandbox.kill()


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    """alpha's browser: its session cookie, and its CSRF token as a default header."""
    cookie = login(server, KEY_A)
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
    cookie = login(server, KEY_B)
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


def test_an_upload_over_the_cap_is_refused(client: httpx.Client, sbx: e2b.Sandbox) -> None:
    big = b"x" * (MAX_UPLOAD_MB * 1024 * 1024 + 1)
    declared = client.post(_api(sbx), params={"path": "/home/user/big.bin"}, content=big)
    assert declared.status_code == 413

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        for at in range(0, len(big), 1 << 16):
            yield big[at : at + (1 << 16)]

    streamed = client.post(
        _api(sbx),
        params={"path": "/home/user/big.bin"},
        content=chunks(),
        headers={"X-CSRF-Token": client.headers["X-CSRF-Token"]},
    )
    assert streamed.status_code == 413
