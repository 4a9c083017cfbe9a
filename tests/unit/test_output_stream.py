"""``OutputStream.readline``: lines across chunks, what iteration gets after it, the line limit."""

from __future__ import annotations

import asyncio

import pytest

from capsa.agent.exec import OutputStream


class _Chunks:
    """Chunks as a call's stream from the guest hands them over."""

    def __init__(self, *chunks: bytes) -> None:
        self._chunks = iter(chunks)

    async def read(self) -> bytes | None:
        return next(self._chunks, None)


def test_lines_across_chunks_then_iteration_gets_the_rest() -> None:
    async def main() -> None:
        stream = OutputStream(_Chunks(b"on", b"e\ntw", b"o\nthr", b"ee"))
        assert await stream.readline() == b"one\n"
        assert await stream.readline() == b"two\n"
        assert await anext(stream) == b"thr"  # what readline had read past its line end
        assert await stream.read() == b"ee"
        assert await stream.readline() == b""

    asyncio.run(main())


def test_a_partial_last_line_is_returned_at_the_end() -> None:
    async def main() -> None:
        stream = OutputStream(_Chunks(b"a\n\n", b"tail"))
        assert [await stream.readline() for _ in range(4)] == [b"a\n", b"\n", b"tail", b""]

    asyncio.run(main())


def test_a_line_past_the_limit_is_dropped_with_an_error() -> None:
    async def main() -> None:
        stream = OutputStream(_Chunks(b"x" * 6, b"y" * 6 + b"\nok\n", b"z" * 20, b"end\n"))
        with pytest.raises(ValueError, match="within 8 bytes"):
            await stream.readline(8)
        assert await stream.readline(8) == b"ok\n"  # the long line went, up to its end
        with pytest.raises(ValueError):
            await stream.readline(8)  # no line end yet: what arrived of it goes
        assert await stream.readline(8) == b"end\n"
        assert await stream.readline(8) == b""
        exact = OutputStream(_Chunks(b"1234567\n"))
        assert await exact.readline(8) == b"1234567\n"  # a line of exactly the limit is fine

    asyncio.run(main())
