"""What the terminal and file-browser tests share: a real ``capsa serve`` with two tenants
(``alpha``, ``beta``), a dashboard login, and a WebSocket to a sandbox's terminal."""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import websocket

from tests.server.conftest import Server, start_server

KEY_A = f"alpha-{secrets.token_hex(16)}"
KEY_B = f"beta-{secrets.token_hex(16)}"
COOKIE = "capsa_ui"
_META = re.compile(r'<meta name="csrf-token" content="([^"]+)"')


def serve(tmp: Path, *args: str) -> Iterator[Server]:
    keys = tmp / "keys.txt"
    keys.write_text(f"{KEY_A} tenant=alpha\n{KEY_B} tenant=beta\n")
    srv = start_server(
        tmp, "--api-key-file", str(keys), "--pool", "base=1", "--max-sandboxes", "4", *args
    )
    try:
        yield srv
    finally:
        srv.stop()


def sdk(server: Server, key: str = KEY_A) -> dict[str, Any]:
    return {"api_key": key, "api_url": server.url, "sandbox_url": server.url, "retries": 0}


def login(server: Server, key: str = KEY_A) -> str:
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
