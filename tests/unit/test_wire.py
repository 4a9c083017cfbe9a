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


def _frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


PING = encode({"t": "req", "id": 1, "op": "ping"})
BAD_THEN_GOOD = [
    _frame(b"\xc1") + PING,  # a body that is not msgpack
    _frame(msgpack.packb([1, 2])) + PING,  # not a map
    _frame(msgpack.packb({"t": "x"}) + b"trailing") + PING,
    struct.pack(">I", MAX_FRAME + 1) + PING,  # an oversized announcement: its 4 bytes are skipped
]


@pytest.mark.parametrize("stream", BAD_THEN_GOOD)
def test_skip_bad_drops_the_bad_frame_and_keeps_the_next(stream: bytes) -> None:
    """What the guest agent does with a frame it cannot decode: drop it, count it, decode the next
    one, whatever the read boundaries (a host can then tell where the decoder stands)."""
    whole = FrameDecoder(skip_bad=True)
    assert whole.feed(stream) == [{"t": "req", "id": 1, "op": "ping"}]
    assert whole.dropped == 1 and whole.last_error and whole.buffered == 0
    split = FrameDecoder(skip_bad=True)
    got = []
    for i in range(len(stream)):
        got += split.feed(stream[i : i + 1])
    assert got == [{"t": "req", "id": 1, "op": "ping"}] and split.dropped == 1


def test_needed_says_what_completes_the_buffered_frame() -> None:
    decoder = FrameDecoder(skip_bad=True)
    assert decoder.needed() == 0
    decoder.feed(PING[:2])
    assert decoder.needed() == 2  # the rest of the header
    decoder.feed(PING[2:6])
    assert decoder.needed() == len(PING) - 6
    assert decoder.feed(PING[6:]) == [{"t": "req", "id": 1, "op": "ping"}]
    assert decoder.needed() == 0
