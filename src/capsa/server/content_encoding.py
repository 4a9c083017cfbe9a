"""gzip ``Content-Encoding`` of envd's ``/files`` downloads: ``files.read(..., gzip=True)`` asks for
``Accept-Encoding: gzip`` (as httpx does by default), and the file is deflated as it streams from
the guest. Uploads are inflated by :func:`capsa.server.uploads.gunzip`."""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterable, AsyncIterator

GZIP_WBITS = 16 + zlib.MAX_WBITS  # a gzip header and trailer, not a raw or zlib stream
GZIP_LEVEL = 1  # fast: the point is the wire, and the server's CPU is shared with its guests


def accepts_gzip(value: str | None) -> bool:
    """Whether an ``Accept-Encoding`` header takes gzip (with a non-zero quality)."""
    for item in (value or "").split(","):
        coding, _, params = item.strip().partition(";")
        if coding.strip().lower() not in ("gzip", "x-gzip"):
            continue
        quality = params.strip().lower()
        if quality.startswith("q="):
            try:
                return float(quality[2:]) > 0
            except ValueError:
                return False
        return True
    return False


async def gzip_chunks(chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    """``chunks`` as one gzip stream, flushed per chunk so a slow download still trickles."""
    deflater = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, GZIP_WBITS)
    async for chunk in chunks:
        out = deflater.compress(chunk) + deflater.flush(zlib.Z_SYNC_FLUSH)
        if out:
            yield out
    yield deflater.flush()
