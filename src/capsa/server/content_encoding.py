"""gzip ``Content-Encoding`` on envd's ``/files``, as the SDKs use it (``files.write(...,
gzip=True)`` uploads a gzip body with ``Content-Encoding: gzip``; ``files.read(..., gzip=True)``
asks for ``Accept-Encoding: gzip``).

Both directions stream: an upload is inflated chunk by chunk as it goes to the guest, a download
deflated as it comes from it. The inflated size of an upload is held to the same cap as a plain
upload (a small gzip bomb must not write more to the guest than an uncompressed upload could).
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterable, AsyncIterator

from capsa.server.limits import RequestRejected

GZIP_WBITS = 16 + zlib.MAX_WBITS  # a gzip header and trailer, not a raw or zlib stream
OUT_CHUNK = 256 * 1024  # inflated bytes handed on at once (bounds memory per step)
GZIP_LEVEL = 1  # fast: the point is the wire, and the server's CPU is shared with its guests


def content_encoding(value: str | None) -> str | None:
    """The upload's encoding (``None`` for identity); anything but gzip is refused (415)."""
    coding = (value or "").strip().lower()
    if coding in ("", "identity"):
        return None
    if coding in ("gzip", "x-gzip"):
        return "gzip"
    raise RequestRejected(415, f"unsupported Content-Encoding {coding[:40]!r}: only gzip is accepted")


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


async def gunzip(chunks: AsyncIterable[bytes], limit: int) -> AsyncIterator[bytes]:
    """The inflated content of a gzip body (members one after another, as gzip allows); more than
    ``limit`` inflated bytes is a 413, a malformed or truncated stream a 400."""
    inflater = zlib.decompressobj(GZIP_WBITS)
    in_member = False  # a member was started and has not ended yet
    total = 0
    async for chunk in chunks:
        data = chunk
        while data:
            in_member = True
            try:
                piece = inflater.decompress(data, OUT_CHUNK)
            except zlib.error as exc:
                raise RequestRejected(400, f"the gzip request body is malformed: {exc}") from None
            total += len(piece)
            if total > limit:
                raise RequestRejected(413, f"the inflated upload is larger than {limit} bytes")
            if piece:
                yield piece
            if inflater.eof:  # the member ended; another may follow
                data, in_member = inflater.unused_data, False
                inflater = zlib.decompressobj(GZIP_WBITS)
            else:
                data = inflater.unconsumed_tail
    if in_member:
        raise RequestRejected(400, "the gzip request body is truncated")


async def gzip_chunks(chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    """``chunks`` as one gzip stream, flushed per chunk so a slow download still trickles."""
    deflater = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, GZIP_WBITS)
    async for chunk in chunks:
        out = deflater.compress(chunk) + deflater.flush(zlib.Z_SYNC_FLUSH)
        if out:
            yield out
    yield deflater.flush()
