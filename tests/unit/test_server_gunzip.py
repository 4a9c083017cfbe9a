"""``capsa.server.uploads.gunzip``: the streaming inflater of gzip-encoded ``/files`` uploads."""

from __future__ import annotations

import asyncio
import gzip
import os
from collections.abc import AsyncIterator

import pytest

from capsa.server.limits import RequestRejected
from capsa.server.uploads import gunzip


async def _chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for offset in range(0, len(data), size):
        yield data[offset : offset + size]


def inflate(data: bytes, size: int = 7, limit: int = 1 << 30) -> tuple[bytes, int]:
    """All the output and the largest single piece of it."""

    async def run() -> tuple[bytes, int]:
        pieces = [piece async for piece in gunzip(_chunks(data, size), limit)]
        return b"".join(pieces), max((len(p) for p in pieces), default=0)

    return asyncio.run(run())


@pytest.mark.parametrize("size", [1, 7, 4096, 1 << 20])
def test_round_trip_at_any_chunking(size: int) -> None:
    content = os.urandom(50_000) + b"\0" * 300_000 + bytes(range(256))
    assert inflate(gzip.compress(content), size)[0] == content


def test_concatenated_members_and_empty_bodies() -> None:
    assert inflate(gzip.compress(b"one ") + gzip.compress(b"") + gzip.compress(b"two"))[0] == b"one two"
    assert inflate(b"")[0] == b""
    assert inflate(gzip.compress(b""))[0] == b""


def test_output_comes_in_bounded_pieces() -> None:
    """Zeros compress ~1000:1: one small input chunk must not become one huge output chunk."""
    content = b"\0" * (8 << 20)
    data, largest = inflate(gzip.compress(content), size=1 << 20)
    assert data == content
    assert largest <= 1 << 16


def test_past_the_limit_is_413() -> None:
    with pytest.raises(RequestRejected) as raised:
        inflate(gzip.compress(b"\0" * (4 << 20)), size=4096, limit=1 << 20)
    assert raised.value.status == 413


@pytest.mark.parametrize(
    "body",
    [
        b"not gzip at all",
        gzip.compress(b"hello world" * 100)[:-12],  # truncated
        gzip.compress(b"x") + b"trailing garbage",
    ],
)
def test_malformed_or_truncated_is_400(body: bytes) -> None:
    with pytest.raises(RequestRejected) as raised:
        inflate(body)
    assert raised.value.status == 400
