"""The parts of the Connect protocol (https://connectrpc.com/docs/protocol) that envd's clients use.

Only the JSON codec: unary calls carry one JSON message (``application/json``); streaming calls
carry enveloped messages (``application/connect+json``): a flags byte, a 4-byte big-endian
length, then the JSON. The last envelope of a stream has flag ``0x02`` and holds the end-of-stream
message (``{}`` or ``{"error": {...}}``). A client-streaming call (``StreamInput``) sends its
messages in one request body as they come (HTTP/1.1 chunks), read with :func:`read_envelopes`.
"""

from __future__ import annotations

import json
import struct
from collections.abc import AsyncIterator
from typing import Any

from capsa.errors import CapsaError

UNARY_TYPE = "application/json"
STREAM_TYPE = "application/connect+json"
END_STREAM = 0x02
COMPRESSED = 0x01
MAX_MESSAGE = 16 << 20

# Connect error codes and the HTTP status a unary error carries.
STATUS = {
    "canceled": 499,
    "unknown": 500,
    "invalid_argument": 400,
    "deadline_exceeded": 504,
    "not_found": 404,
    "already_exists": 409,
    "permission_denied": 403,
    "resource_exhausted": 429,
    "failed_precondition": 400,
    "aborted": 409,
    "out_of_range": 400,
    "unimplemented": 501,
    "internal": 500,
    "unavailable": 503,
    "unauthenticated": 401,
}


class ConnectError(CapsaError):
    """An RPC failed; ``code`` is a Connect error code (``not_found``, ``unauthenticated``, …)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code if code in STATUS else "unknown"

    @property
    def status(self) -> int:
        return STATUS[self.code]

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message}


def envelope(message: dict[str, Any], flags: int = 0) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    return struct.pack(">BI", flags, len(body)) + body


def end_stream(error: ConnectError | None = None) -> bytes:
    return envelope({"error": error.to_json()} if error else {}, END_STREAM)


def parse_envelopes(data: bytes) -> list[dict[str, Any]]:
    """The messages of an enveloped request body (a server-streaming call sends exactly one)."""
    messages: list[dict[str, Any]] = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < 5:
            raise ConnectError("invalid_argument", "truncated envelope header")
        flags, length = struct.unpack_from(">BI", data, offset)
        offset += 5
        if flags & COMPRESSED:
            raise ConnectError("unimplemented", "compressed messages are not supported")
        if length > MAX_MESSAGE or offset + length > len(data):
            raise ConnectError("invalid_argument", "truncated or oversized envelope")
        if not flags & END_STREAM:
            messages.append(parse_message(data[offset : offset + length]))
        offset += length
    return messages


async def read_envelopes(
    chunks: AsyncIterator[bytes], limit: int = MAX_MESSAGE
) -> AsyncIterator[dict[str, Any]]:
    """The messages of an enveloped request body, each as soon as it is complete (a client that
    streams its input gets each chunk delivered without waiting for the end of the body). A
    message over ``limit`` bytes, a compressed one, or a body cut mid-envelope raises."""
    buffer = bytearray()
    async for chunk in chunks:
        buffer += chunk
        while len(buffer) >= 5:
            flags, length = struct.unpack_from(">BI", buffer)
            if flags & COMPRESSED:
                raise ConnectError("unimplemented", "compressed messages are not supported")
            if length > limit:
                raise ConnectError("resource_exhausted", f"a message is larger than {limit} bytes")
            if len(buffer) < 5 + length:
                break
            data = bytes(buffer[5 : 5 + length])
            del buffer[: 5 + length]
            if not flags & END_STREAM:
                yield parse_message(data)
    if buffer:
        raise ConnectError("invalid_argument", "the request body ends inside an envelope")


def parse_message(data: bytes) -> dict[str, Any]:
    if not data:
        return {}
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as exc:  # RecursionError: nesting too deep
        raise ConnectError("invalid_argument", f"malformed JSON message: {exc}") from None
    if not isinstance(value, dict):
        raise ConnectError("invalid_argument", "a message must be a JSON object")
    return value


def timeout_seconds(header: str | None) -> float | None:
    """The ``Connect-Timeout-Ms`` header as seconds (None if absent or malformed)."""
    if header is None or not header.isdigit() or len(header) > 10:
        return None
    return int(header) / 1000
