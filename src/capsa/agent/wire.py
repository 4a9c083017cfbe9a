"""The agent wire protocol, shared by the host client and the guest agent.

This file imports only the stdlib and msgpack because the same file is copied into the guest image
and run by the guest's Python.

Framing
-------
A frame is a 4-byte big-endian length ``N`` followed by ``N`` bytes of msgpack encoding one map with a
string key ``"t"`` (the message type). ``N`` is capped at :data:`MAX_FRAME`; a peer announcing more is
in violation before a single payload byte is buffered, so a hostile guest cannot make the host
allocate more than one frame's worth of memory per connection.

Messages (version :data:`PROTOCOL_VERSION`)
--------------------------------------------
``hello``  guest → host, first frame after the agent opens its port: ``{"v": version, "pid": int}``.
           The host refuses any other version.
``req``    host → guest: ``{"id": int > 0, "op": str, ...arguments}``. Ids are never reused and
           stay below 2**63; the guest drops a request whose id is not such an int (no reply
           could carry it) and answers every other one, a malformed one with ``bad_request``.
``res``    guest → host, exactly one per ``req``: ``{"id", "ok": True, ...results}`` or
           ``{"id", "ok": False, "err": {"kind", "msg", "errno", "path"}}``; ``kind`` is one of
           :data:`ERROR_KINDS`.
``data``   either way: ``{"id", "s": stream, "d": bytes}`` with ``stream`` one of ``stdout``,
           ``stderr``, ``stdin``, ``file``. Never empty.
``eof``    either way: ``{"id", "s"}``: no more ``data`` on that stream.
``ack``    the receiver of a stream grants credit back: ``{"id", "s", "n": int}``.
``end``    guest → host, last message of a streaming request: for ``exec``
           ``{"id", "code": int | None, "signal": int | None}``, for ``write_file`` the same shape as
           a ``res``.
``cancel`` host → guest ``{"id"}``: abandon a streaming request (the guest stops sending).

Operations: ``ping``; ``info``; ``exec {argv, env, cwd, stdin: bool, pty, user}`` (``res`` carries
``pid``, then ``stdout``/``stderr`` streams and an ``end``); ``kill {target: exec id, signal}``;
``read_file {path}`` (``res`` carries ``size``, then a ``file`` stream); ``write_file {path, mode,
user}`` (after ``res`` the host sends a ``file`` stream, the guest answers with ``end``);
``list_dir``, ``stat {path, follow}``, ``exists``, ``mkdir {path, parents, mode, user}``,
``remove {path, recursive}``; ``shutdown`` (``res``, then the guest powers off). ``user`` (optional)
names a guest account, resolved by the guest from its ``/etc/passwd``: the command runs as it, or it
owns what the write creates.

Back-pressure
-------------
Each direction of each stream starts with :data:`WINDOW` units of credit. Sending a ``data`` frame of
``n`` bytes costs :func:`cost` ``(n)`` units (the payload plus a fixed per-frame charge, so a flood of
tiny frames is bounded too); the sender stops when its credit is spent and resumes on ``ack``. A
receiver that is owed more than :data:`WINDOW` units has met a protocol violation, so what one
stream can make its receiver buffer is bounded.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

PROTOCOL_VERSION = 1
MAX_FRAME = (1 << 20) + (64 << 10)  # a 1 MiB data chunk plus headroom for the envelope
CHUNK = 1 << 20  # largest data payload a sender puts in one frame
WINDOW = 8 << 20  # credit per stream direction, in cost units
FRAME_COST = 1024  # fixed charge per data frame, on top of its payload
STREAMS = ("stdout", "stderr", "stdin", "file")
ERROR_KINDS = (
    "not_found",  # the path (or the program to exec) does not exist
    "permission",  # EACCES / EPERM / EROFS
    "exists",  # mkdir of an existing path without parents
    "is_a_directory",
    "not_a_directory",
    "not_empty",  # remove of a non-empty directory without recursive
    "os_error",  # any other errno
    "bad_request",  # the host sent something the agent does not understand
    "unknown_target",  # kill for an exec id the agent does not know
    "unknown_user",  # a request's ``user`` names no account of the guest
)
_HEADER = struct.Struct(">I")


def cost(payload_len: int) -> int:
    """Credit a data frame of ``payload_len`` bytes consumes."""
    return payload_len + FRAME_COST


class WireError(Exception):
    """The peer sent bytes that are not a valid frame."""


def encode_parts(message: dict[str, Any]) -> tuple[bytes, bytes]:
    """Header and body of one frame, unjoined: a writer that can send both saves copying a 1 MiB
    chunk once more (which counts in a guest running under TCG)."""
    body: bytes = msgpack.packb(message, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise WireError(f"frame of {len(body)} bytes exceeds the {MAX_FRAME}-byte limit")
    return _HEADER.pack(len(body)), body


def encode(message: dict[str, Any]) -> bytes:
    header, body = encode_parts(message)
    return header + body


class FrameDecoder:
    """Incremental decoder: ``feed`` bytes as they arrive, get back the complete messages.

    By default a bad frame raises :class:`WireError` (the host fails the whole connection). With
    ``skip_bad=True`` (the guest agent, which must outlive any input) a frame whose body is not a
    valid message is dropped whole and decoding goes on after it, and an oversized announcement
    drops its 4 header bytes and decoding goes on at the next byte; :attr:`dropped` counts them and
    :attr:`last_error` says what the last one was. Either way the outcome depends only on the
    bytes, never on how they were split into reads, so a peer can tell where the decoder stands
    (see :meth:`needed`).
    """

    def __init__(self, max_frame: int = MAX_FRAME, *, skip_bad: bool = False) -> None:
        self._buffer = bytearray()
        self._max = max_frame
        self._skip = skip_bad
        self.dropped = 0
        self.last_error = ""

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buffer += data
        messages: list[dict[str, Any]] = []
        while len(self._buffer) >= _HEADER.size:
            (length,) = _HEADER.unpack_from(self._buffer)
            if length > self._max:
                error = WireError(f"peer announced a {length}-byte frame (limit {self._max})")
                if not self._skip:
                    raise error
                self._dropped(error)
                del self._buffer[: _HEADER.size]
                continue
            end = _HEADER.size + length
            if len(self._buffer) < end:
                break
            view = memoryview(self._buffer)  # decode in place: no copy of the body
            body = view[_HEADER.size : end]
            try:
                messages.append(_decode_body(body))
            except WireError as error:
                if not self._skip:
                    raise
                self._dropped(error)
            finally:
                body.release()  # the buffer cannot shrink while a view of it exists
                view.release()
            del self._buffer[:end]
        return messages

    def _dropped(self, error: WireError) -> None:
        self.dropped += 1
        self.last_error = str(error)

    def needed(self) -> int:
        """How many more bytes complete what is buffered: the rest of the header, or of the body."""
        if not self._buffer:
            return 0
        if len(self._buffer) < _HEADER.size:
            return _HEADER.size - len(self._buffer)
        length: int = _HEADER.unpack_from(self._buffer)[0]
        return _HEADER.size + length - len(self._buffer)

    @property
    def buffered(self) -> int:
        return len(self._buffer)


def _decode_body(body: bytes | memoryview) -> dict[str, Any]:
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:  # ValueError, ExtraData, FormatError, StackError, or anything else
        raise WireError(f"malformed frame: {exc}") from None
    if not isinstance(message, dict) or not isinstance(message.get("t"), str):
        raise WireError("a frame must be a map with a string 't' (type) key")
    return message
