"""Framing shared by the host client and the guest agent. Imports only the stdlib and msgpack,
because the same file is copied into the guest image and run by the guest's Python.

A frame is a 4-byte big-endian length ``N`` followed by ``N`` bytes of msgpack encoding one map with a
string key ``"t"`` (the message type). ``N`` is capped at :data:`MAX_FRAME`; a peer announcing more is
in violation before a single payload byte is buffered, so a hostile guest cannot make the host
allocate more than one frame's worth of memory per connection.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

PROTOCOL_VERSION = 1
MAX_FRAME = (1 << 20) + (64 << 10)  # a 1 MiB data chunk plus headroom for the envelope
CHUNK = 1 << 20  # largest data payload a sender puts in one frame
_HEADER = struct.Struct(">I")


class WireError(Exception):
    """The peer sent bytes that are not a valid frame."""


def encode(message: dict[str, Any]) -> bytes:
    body: bytes = msgpack.packb(message, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise WireError(f"frame of {len(body)} bytes exceeds the {MAX_FRAME}-byte limit")
    return _HEADER.pack(len(body)) + body


class FrameDecoder:
    """Incremental decoder: ``feed`` bytes as they arrive, get back the complete messages."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buffer = bytearray()
        self._max = max_frame

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buffer += data
        messages: list[dict[str, Any]] = []
        while len(self._buffer) >= _HEADER.size:
            (length,) = _HEADER.unpack_from(self._buffer)
            if length > self._max:
                raise WireError(f"peer announced a {length}-byte frame (limit {self._max})")
            end = _HEADER.size + length
            if len(self._buffer) < end:
                break
            body = bytes(self._buffer[_HEADER.size : end])
            del self._buffer[:end]
            messages.append(_decode_body(body))
        return messages

    @property
    def buffered(self) -> int:
        return len(self._buffer)


def _decode_body(body: bytes) -> dict[str, Any]:
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise WireError(f"malformed frame: {exc}") from None
    if not isinstance(message, dict) or not isinstance(message.get("t"), str):
        raise WireError("a frame must be a map with a string 't' (type) key")
    return message
