"""gzip downloads and signed ``/files`` URLs of ``capsa serve``, without a guest."""

from __future__ import annotations

import asyncio
import gzip
import types
from collections.abc import AsyncIterator
from urllib.parse import urlencode

import pytest

from capsa.server.content_encoding import accepts_gzip, gzip_chunks
from capsa.server.entry import ApiError
from capsa.server.signed_urls import has_signature, signature, signed_sandbox


async def _chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def test_gzip_chunks_round_trip() -> None:
    async def run() -> bytes:
        return b"".join([c async for c in gzip_chunks(_chunks(b"hello world" * 1000, 100))])

    assert gzip.decompress(asyncio.run(run())) == b"hello world" * 1000


def test_accept_encoding() -> None:
    assert accepts_gzip("gzip, deflate") and accepts_gzip("br;q=1, gzip;q=0.5")
    assert not accepts_gzip(None) and not accepts_gzip("identity") and not accepts_gzip("gzip;q=0")


def _entry(token: str) -> types.SimpleNamespace:
    return types.SimpleNamespace(token=token)


def test_signature_matches_the_sdk() -> None:
    sdk = pytest.importorskip("e2b.sandbox.signature")
    for user, seconds in ((None, None), ("user", 60)):
        theirs = sdk.get_signature("a/b.txt", "read", user, "tok", seconds)
        ours = signature("a/b.txt", "read", user or "", "tok", theirs["expiration"])
        assert ours == theirs["signature"]


def test_signed_sandbox_finds_the_signer_only() -> None:
    entries = [_entry("one"), _entry("two")]
    sig = signature("f.txt", "read", "", "two", None)
    query = urlencode({"path": "f.txt", "signature": sig}).encode()
    assert has_signature(query) and not has_signature(b"path=f.txt&notsignature=1")
    assert signed_sandbox(entries, "GET", query) is entries[1]  # type: ignore[arg-type]
    for method, q in (("POST", query), ("GET", query.replace(b"f.txt", b"g.txt"))):
        with pytest.raises(ApiError) as caught:
            signed_sandbox(entries, method, q)  # type: ignore[arg-type]
        assert caught.value.status == 401
    old = signature("f.txt", "read", "", "one", 1000)
    expired = urlencode({"path": "f.txt", "signature": old, "signature_expiration": 1000}).encode()
    with pytest.raises(ApiError) as caught:
        signed_sandbox(entries, "GET", expired, now=2000)  # type: ignore[arg-type]
    assert caught.value.message == "signature is already expired"
    assert signed_sandbox(entries, "GET", expired, now=999) is entries[0]  # type: ignore[arg-type]
