"""Attacks on ingress (``get_host(port)``): reaching a private sandbox's ports without its traffic
token, and a hostile server in the guest answering with an endless response head or garbage."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import httpx
import pytest

e2b = pytest.importorskip("e2b")

from e2b import Sandbox  # noqa: E402

from tests.server.conftest import Server, start_server  # noqa: E402

pytestmark = [pytest.mark.vm, pytest.mark.timeout(240)]

# 8100: an endless response head; 8101: bytes that are no HTTP at all; 8000: a plain file server.
HOSTILE = r"""
import socket, threading
def serve(port, answer):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port)); s.listen(64)
    while True:
        conn, _ = s.accept()
        threading.Thread(target=answer, args=(conn,), daemon=True).start()
def endless_head(conn):
    conn.recv(65536)
    try:
        conn.sendall(b"HTTP/1.1 200 OK\r\n")
        while True:
            conn.sendall(b"X-Padding: " + b"a" * 4000 + b"\r\n")
    except OSError:
        conn.close()
def garbage(conn):
    conn.recv(65536)
    conn.sendall(b"\x00\xffNOT HTTP\r\n\r\n" * 10)
    conn.close()
threading.Thread(target=serve, args=(8100, endless_head), daemon=True).start()
serve(8101, garbage)
"""


@pytest.fixture(scope="module")
def private(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Sandbox]]:
    srv = start_server(tmp_path_factory.mktemp("serve"), "--pool", "base=1", "--max-sandboxes", "3")
    old = {k: os.environ.get(k) for k in srv.env()}
    os.environ.update(srv.env())
    sandbox = None
    try:
        sandbox = Sandbox.create(timeout=300, network={"allow_public_traffic": False})
        sandbox.files.write("/tmp/www/secret.txt", "secret\n")
        sandbox.files.write("/tmp/hostile.py", HOSTILE)
        sandbox.commands.run("python3 -m http.server 8000 --directory /tmp/www", background=True)
        sandbox.commands.run("python3 /tmp/hostile.py", background=True)
        yield srv, sandbox
    finally:
        if sandbox is not None:
            sandbox.kill()
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        srv.stop()


def _get(srv: Server, sandbox: Sandbox, port: int, path: str = "/", **headers: str) -> httpx.Response:
    token = {"e2b-traffic-access-token": sandbox.traffic_access_token or ""}
    return httpx.get(
        f"{srv.url}{path}", headers={"Host": sandbox.get_host(port), **token, **headers}, timeout=60
    )


def _wait(srv: Server, sandbox: Sandbox, port: int, path: str = "/") -> None:
    deadline = time.monotonic() + 60
    while "nothing listens" in _get(srv, sandbox, port, path).text:
        assert time.monotonic() < deadline, f"port {port} never opened"
        time.sleep(0.2)


def test_private_ports_need_the_traffic_token(private: tuple[Server, Sandbox]) -> None:
    """Attack: a client that knows a private sandbox's id (allow_public_traffic=False) fetches from
    one of its ports without the traffic token, with a wrong one, or with the token in another
    header. Only the token in ``e2b-traffic-access-token`` opens it."""
    srv, sandbox = private
    _wait(srv, sandbox, 8000, "/secret.txt")
    url, host = f"{srv.url}/secret.txt", sandbox.get_host(8000)
    token = sandbox.traffic_access_token or ""
    assert httpx.get(url, headers={"Host": host}).status_code == 403
    assert (
        httpx.get(url, headers={"Host": host, "e2b-traffic-access-token": token[:-1]}).status_code == 403
    )
    assert httpx.get(url, headers={"Host": host, "x-access-token": token}).status_code == 403
    by_id = {"E2b-Sandbox-Id": sandbox.sandbox_id, "E2b-Sandbox-Port": "8000"}
    assert httpx.get(url, headers=by_id).status_code == 403
    ok = _get(srv, sandbox, 8000, "/secret.txt")
    assert (ok.status_code, ok.text) == (200, "secret\n")


def test_the_traffic_token_does_not_drive_envd(private: tuple[Server, Sandbox]) -> None:
    """Attack: whoever was given a private sandbox's traffic token (to open its web app) uses it as
    the envd access token to run commands in the sandbox. The two tokens differ, and envd refuses
    the traffic token."""
    srv, sandbox = private
    token = sandbox.traffic_access_token or ""
    assert token and token != sandbox._envd_access_token
    reply = httpx.post(
        f"{srv.url}/process.Process/List",
        json={},
        headers={
            "E2b-Sandbox-Id": sandbox.sandbox_id,
            "E2b-Sandbox-Port": "49983",
            "X-Access-Token": token,
            "Content-Type": "application/json",
        },
        timeout=30,
    )
    assert reply.status_code == 401, reply.text


def test_hostile_guest_responses_get_a_502(private: tuple[Server, Sandbox]) -> None:
    """Attack: a server in the sandbox answers with a response head that never ends (the proxy
    would buffer it without bound) or with bytes that are not HTTP. Each request gets a prompt 502
    and the server keeps serving."""
    srv, sandbox = private
    _wait(srv, sandbox, 8101)
    for port in (8100, 8101):
        started = time.monotonic()
        reply = _get(srv, sandbox, port)
        assert reply.status_code == 502, (port, reply.status_code, reply.text[:200])
        assert "malformed response" in reply.json()["message"]
        assert time.monotonic() - started < 30
    assert httpx.get(f"{srv.url}/health").status_code == 200
    assert _get(srv, sandbox, 8000, "/secret.txt").status_code == 200


def test_forks_of_a_private_sandbox_are_private(private: tuple[Server, Sandbox]) -> None:
    """Attack: fork a private sandbox (allow_public_traffic=False) and reach the clone's ports
    without a token: the clone must keep the parent's setting (and answer its own token). Runs
    last: a fork stops the parent's running commands."""
    srv, sandbox = private
    [clone] = sandbox.fork(count=1, timeout=120)
    assert isinstance(clone, Sandbox)
    try:
        clone.commands.run("python3 -m http.server 8000 --directory /tmp/www", background=True)
        _wait(srv, clone, 8000, "/secret.txt")
        url, host = f"{srv.url}/secret.txt", clone.get_host(8000)
        assert httpx.get(url, headers={"Host": host}).status_code == 403
        assert _get(srv, clone, 8000, "/secret.txt").text == "secret\n"
    finally:
        clone.kill()
