"""What the terminal and file-browser tests share (on the shared ``ui_server`` of conftest.py): a
dashboard login without a browser, the session's CSRF token, and a WebSocket to a terminal."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import httpx
import websocket

from tests.server.conftest import Server
from tests.ui.conftest import ALICE

COOKIE = "capsa_ui"
_META = re.compile(r'<meta name="csrf-token" content="([^"]+)"')


def sdk(server: Server, key: str = ALICE) -> dict[str, Any]:
    return {"api_key": key, "api_url": server.url, "sandbox_url": server.url, "retries": 0}


def login(server: Server, key: str = ALICE) -> str:
    """The session cookie the login page gives for ``key``."""
    reply = httpx.post(f"{server.url}/ui/login", data={"api_key": key}, timeout=10)
    assert reply.status_code == 303, reply.text
    return reply.cookies[COOKIE]


def csrf(server: Server, cookie: str) -> str:
    """The session's CSRF token, as a page carries it (``<meta name="csrf-token">``)."""
    page = httpx.get(f"{server.url}/ui/", cookies={COOKIE: cookie}, timeout=10)
    found = _META.search(page.text)
    assert found is not None, page.text[:500]
    return found.group(1)


def terminal(
    server: Server, cookie: str | None, sandbox_id: str, *, origin: str | None = "same", query: str = ""
) -> websocket.WebSocket:
    host = server.url.removeprefix("http://")
    headers = {}
    if origin is not None:
        headers["Origin"] = server.url if origin == "same" else origin
    return websocket.create_connection(
        f"ws://{host}/ui/api/sandboxes/{sandbox_id}/terminal{query}",
        header=headers,
        cookie=None if cookie is None else f"{COOKIE}={cookie}",
        suppress_origin=True,
        timeout=30,
    )


def read_until(ws: websocket.WebSocket, wanted: bytes, timeout: float = 30) -> bytes:
    """The terminal's output until ``wanted`` appears in it."""
    seen = b""
    deadline = time.monotonic() + timeout
    while wanted not in seen:
        assert time.monotonic() < deadline, f"{wanted!r} not seen in {seen[-500:]!r}"
        opcode, data = ws.recv_data()
        assert opcode == websocket.ABNF.OPCODE_BINARY, (opcode, data)
        seen += data
    return seen


def exit_frame(ws: websocket.WebSocket, timeout: float = 30) -> tuple[dict[str, Any], int | None]:
    """The server's exit message (terminal output before it skipped) and the close code."""
    deadline = time.monotonic() + timeout
    while True:
        assert time.monotonic() < deadline, "no exit frame"
        frame = ws.recv_frame()
        if frame.opcode == websocket.ABNF.OPCODE_TEXT:
            message = json.loads(frame.data)
            break
        if frame.opcode == websocket.ABNF.OPCODE_CLOSE:
            raise AssertionError(f"closed without an exit frame: {frame.data!r}")
    close = ws.recv_frame()
    code = int.from_bytes(close.data[:2], "big") if close.opcode == websocket.ABNF.OPCODE_CLOSE else None
    return message, code
