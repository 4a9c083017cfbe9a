"""The dashboard's terminal (issue 29) over a real WebSocket to a real ``capsa serve``: a login shell
in the sandbox's PTY typed into and resized, the handshakes it refuses (no session, another origin,
another tenant's sandbox), the frames it refuses, the exit frame when the sandbox is killed, and the
shell freed when the browser goes away."""

from __future__ import annotations

import json
import re
import time

import httpx
import pytest
import websocket

e2b = pytest.importorskip("e2b")

from tests.server.conftest import API_KEY, Server  # noqa: E402
from tests.ui.conftest import ALICE, BOB  # noqa: E402
from tests.ui.termfiles import (  # noqa: E402
    COOKIE,
    csrf,
    exit_frame,
    login,
    read_until,
    sdk,
    terminal,
)

pytestmark = [pytest.mark.vm, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def cookie(server: Server) -> str:
    return login(server, ALICE)


def test_typing_shows_output_and_resize_reaches_the_shell(
    server: Server, sbx: e2b.Sandbox, cookie: str
) -> None:
    ws = terminal(server, cookie, sbx.sandbox_id, query="?rows=30&cols=90")
    try:
        ws.send_binary(b"echo ui-$((6*7))\r")
        read_until(ws, b"ui-42")
        ws.send_binary(b"stty size; whoami\r")
        read_until(ws, b"30 90")
        read_until(ws, b"user")
        ws.send(json.dumps({"type": "resize", "rows": 33, "cols": 101}))
        ws.send_binary(b"stty size\r")
        read_until(ws, b"33 101")
    finally:
        ws.close()


def _refused(server: Server, cookie: str | None, sandbox_id: str, **kwargs: str | None) -> None:
    with pytest.raises(websocket.WebSocketBadStatusException) as caught:
        terminal(server, cookie, sandbox_id, **kwargs)  # type: ignore[arg-type]
    assert caught.value.status_code == 403


def test_handshakes_without_a_session_from_elsewhere_or_to_another_tenant_are_refused(
    server: Server, sbx: e2b.Sandbox, cookie: str
) -> None:
    _refused(server, None, sbx.sandbox_id)
    _refused(server, cookie + "x", sbx.sandbox_id)  # an altered cookie
    _refused(server, cookie, sbx.sandbox_id, origin="http://evil.example")
    _refused(server, cookie, sbx.sandbox_id, origin="http://8000-" + sbx.sandbox_id + ".localhost:3000")
    _refused(server, cookie, sbx.sandbox_id, origin=None)
    _refused(server, login(server, BOB), sbx.sandbox_id)  # beta's session, alpha's sandbox
    _refused(server, cookie, "i" + "0" * 20)
    _refused(server, cookie, sbx.sandbox_id, query="?rows=0&cols=80")


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("not json", 1008),
        (json.dumps({"type": "resize", "rows": 0, "cols": 80}), 1008),
        (json.dumps({"type": "resize", "rows": 24, "cols": 10**9}), 1008),
        (json.dumps({"type": "resize", "rows": True, "cols": 80}), 1008),
        (json.dumps({"type": "exec", "cmd": "id"}), 1008),
        (b"x" * (65 << 10), 1009),
        ("{" + " " * 2000 + "}", 1009),
    ],
)
def test_malformed_and_oversized_frames_end_the_session(
    server: Server, sbx: e2b.Sandbox, cookie: str, frame: str | bytes, code: int
) -> None:
    ws = terminal(server, cookie, sbx.sandbox_id)
    try:
        if isinstance(frame, bytes):
            ws.send_binary(frame)
        else:
            ws.send(frame)
        message, closed = exit_frame(ws)
        assert message["type"] == "exit" and message["reason"].startswith("frame refused"), message
        assert closed == code
    finally:
        ws.close()


def _shell_pid(ws: websocket.WebSocket) -> int:
    ws.send_binary(b"echo pid-$$-$((40+2))\r")  # the echoed command line does not match
    found = re.search(rb"pid-(\d+)-42", read_until(ws, b"-42\r\n"))
    assert found is not None
    return int(found.group(1))


def test_a_disconnected_browser_frees_its_shell(server: Server, sbx: e2b.Sandbox, cookie: str) -> None:
    before = _open_streams(server).get("terminal", 0)  # the shared browser may show one
    ws = terminal(server, cookie, sbx.sandbox_id)
    pid = _shell_pid(ws)
    assert sbx.commands.run(f"kill -0 {pid} && echo alive").stdout.strip() == "alive"
    assert _open_streams(server).get("terminal", 0) == before + 1
    ws.close()
    deadline = time.monotonic() + 15
    while (
        sbx.commands.run(f"kill -0 {pid} 2>/dev/null && echo alive || echo gone").stdout.strip()
        != "gone"
    ):
        assert time.monotonic() < deadline, f"shell {pid} still runs after the browser left"
        time.sleep(0.3)
    assert _open_streams(server).get("terminal", 0) == before


def _open_streams(server: Server) -> dict[str, int]:
    """The dashboard's open long-lived connections by kind (its server page, as the admin)."""
    admin = login(server, API_KEY)
    reply = httpx.get(f"{server.url}/ui/api/server", cookies={COOKIE: admin}, timeout=30)
    streams: dict[str, int] = reply.json()["health"]["streams"]
    return streams


def test_a_sandbox_killed_mid_session_ends_it_with_a_reason(server: Server, cookie: str) -> None:
    victim = e2b.Sandbox.create(**sdk(server, ALICE))
    ws = terminal(server, cookie, victim.sandbox_id)
    try:
        _shell_pid(ws)
        victim.kill()
        message, code = exit_frame(ws)
        assert message == {"type": "exit", "reason": "the sandbox was killed"}
        assert code == 1000
    finally:
        ws.close()


def test_a_sandbox_paused_mid_session_ends_it_and_a_paused_one_opens_none(
    server: Server, cookie: str
) -> None:
    victim = e2b.Sandbox.create(**sdk(server, ALICE))
    try:
        ws = terminal(server, cookie, victim.sandbox_id)
        try:
            _shell_pid(ws)
            victim.pause()
            message, _ = exit_frame(ws)
            assert message == {"type": "exit", "reason": "the sandbox was paused"}
        finally:
            ws.close()
        ws = terminal(server, cookie, victim.sandbox_id)  # paused: told so at once
        try:
            assert exit_frame(ws)[0] == {"type": "exit", "reason": "the sandbox was paused"}
        finally:
            ws.close()
    finally:
        victim.kill()


def test_logging_out_ends_an_open_terminal(server: Server, sbx: e2b.Sandbox) -> None:
    cookie = login(server, ALICE)
    ws = terminal(server, cookie, sbx.sandbox_id)
    try:
        pid = _shell_pid(ws)
        out = httpx.post(
            f"{server.url}/ui/logout",
            cookies={COOKIE: cookie},
            headers={"X-CSRF-Token": csrf(server, cookie)},
        )
        assert out.status_code == 204
        message, _ = exit_frame(ws)
        assert message == {
            "type": "exit",
            "reason": "the dashboard session ended (logged out or expired)",
        }
    finally:
        ws.close()
    assert sbx.commands.run(f"kill -0 {pid} 2>/dev/null || echo gone").stdout.strip() == "gone"
