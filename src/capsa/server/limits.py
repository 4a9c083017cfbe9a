"""The resource limits of ``capsa serve``'s HTTP surface, and the request checks that need no route.

A client, with a key or without, must not be able to make the server hold memory, connections or
time without bound: header and keep-alive timeouts and a connection limit (enforced by
:mod:`capsa.server.http_guard` in uvicorn's protocol), request bodies counted as they arrive (a cap
per kind of request, answered with 413 without reading the rest), an idle timeout between body
chunks, and headers that must be well formed (one ``E2b-Sandbox-Id``, ASCII tokens) before any route
sees them. What is written to the access log is escaped so a request cannot forge log lines.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from starlette.types import Message, Receive

from capsa.server.api_error import ApiError

MiB = 1 << 20
# A StreamInput body (commands.stream_input) may be quiet between inputs: the SDKs send a keepalive
# message every 50 s, so its idle timeout is longer than other bodies'.
INPUT_STREAM_IDLE = 120.0
INPUT_STREAM_PATH = "/process.Process/StreamInput"


@dataclass(frozen=True)
class Limits:
    """Every bound of the HTTP surface (``capsa serve`` flags; see docs/server.md, "Limits")."""

    header_timeout: float = 10.0  # a request's head must be complete this long after it may start
    keep_alive_timeout: int = 5  # an idle keep-alive connection is closed after this
    body_timeout: float = 30.0  # the longest gap between two chunks of a request body
    max_connections: int = 1000  # open connections (and requests in flight); past it: 503
    max_header_bytes: int = 16 << 10  # request line + headers
    max_json_bytes: int = 1 * MiB  # a control-plane request body (JSON)
    max_rpc_bytes: int = 16 * MiB  # an envd Connect RPC or code-interpreter request body
    max_upload_bytes: int = 1024 * MiB  # a /files upload, streamed to the guest
    stream_queue: int = 8  # output events buffered per stream subscriber
    stream_stall: float = 30.0  # a subscriber this long behind while others wait is dropped


class RequestRejected(ApiError):
    """A request broke a limit or was malformed before a route could use it (``status``: 400, 408
    or 413); an :class:`ApiError`, so the control plane answers it like its own errors."""


class LimitedBody:
    """An ASGI ``receive`` that counts the request body as it arrives: past ``limit`` bytes, or
    when the client goes quiet for ``idle_timeout`` seconds mid-body, it raises
    :class:`RequestRejected` (413 / 408) instead of handing on more. Once the body is complete it
    is a plain pass-through (a streaming response waits on ``receive`` for the disconnect)."""

    def __init__(self, receive: Receive, limit: int, idle_timeout: float) -> None:
        self._receive = receive
        self.limit = limit
        self._idle = idle_timeout
        self.received = 0
        self._done = False

    async def __call__(self) -> Message:
        if self._done:
            return await self._receive()
        try:
            async with asyncio.timeout(self._idle):
                message = await self._receive()
        except TimeoutError:
            raise RequestRejected(408, f"no request body data for {self._idle:g}s") from None
        if message["type"] != "http.request":  # the client went away mid-body
            raise RequestRejected(400, "the client disconnected before the end of its request body")
        self.received += len(message.get("body", b""))
        if self.received > self.limit:
            raise RequestRejected(413, f"the request body is larger than {self.limit} bytes")
        if not message.get("more_body", False):
            self._done = True
        return message


def single_header(raw: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    """The value of header ``name`` (lowercase) if present once; a repeat is a 400 (a proxy and this
    server could each pick a different one), and so is a value that is not printable ASCII."""
    values = [v for k, v in raw if k.lower() == name]
    if not values:
        return None
    if len(values) > 1:
        raise RequestRejected(400, f"the {name.decode()} header is repeated")
    value = values[0]
    if not all(0x20 <= b < 0x7F for b in value):
        raise RequestRejected(400, f"the {name.decode()} header is not printable ASCII")
    return value.decode("ascii")


def content_length(raw: list[tuple[bytes, bytes]]) -> int | None:
    value = single_header(raw, b"content-length")
    if value is None:
        return None
    if not value.isdigit() or len(value) > 18:
        raise RequestRejected(400, "malformed Content-Length")
    return int(value)


def log_safe(value: str, limit: int = 300) -> str:
    """``value`` for one log line: control and non-ASCII characters escaped (a ``%0a`` in a path
    cannot start a forged line), cut at ``limit`` characters."""
    escaped = value.encode("unicode_escape").decode("ascii")
    return escaped if len(escaped) <= limit else escaped[:limit] + "..."
