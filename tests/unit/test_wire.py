"""Agent wire framing: round trips and hostile input (no VM)."""

from __future__ import annotations

import struct

import msgpack
import pytest

from capsa.agent.wire import MAX_FRAME, FrameDecoder, WireError, encode


def test_round_trip_byte_by_byte() -> None:
    messages = [{"t": "req", "id": 1, "op": "ping"}, {"t": "data", "id": 1, "d": b"\x00\xff" * 1000}]
    stream = b"".join(encode(m) for m in messages)
    decoder = FrameDecoder()
    got = []
    for i in range(len(stream)):
        got += decoder.feed(stream[i : i + 1])
    assert got == messages and decoder.buffered == 0


def test_oversized_announcement_rejected_before_buffering() -> None:
    decoder = FrameDecoder()
    with pytest.raises(WireError, match="announced"):
        decoder.feed(struct.pack(">I", MAX_FRAME + 1))
    with pytest.raises(WireError):
        encode({"t": "data", "d": b"x" * (MAX_FRAME + 1)})


@pytest.mark.parametrize(
    "body",
    [
        b"\xc1",  # a msgpack byte that is never valid
        msgpack.packb([1, 2, 3]),
        msgpack.packb({"no_type": 1}),
        msgpack.packb({"t": 5}),
        msgpack.packb({1: "int key"}),
        msgpack.packb({"t": "x"}) + b"trailing",
    ],
)
def test_malformed_frames_raise(body: bytes) -> None:
    with pytest.raises(WireError):
        FrameDecoder().feed(struct.pack(">I", len(body)) + body)
