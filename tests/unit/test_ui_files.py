"""The dashboard file browser's pure parts: upload names, the attachment header, the streamed cap."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from capsa.server.limits import RequestRejected
from capsa.server.ui.files import attachment, capped, upload_name


@pytest.mark.parametrize(
    "name", ["", " ", ".", "..", "../x", "a/b", "a\\b", "a\x00b", "a\nb", "x" * 256]
)
def test_upload_names_that_are_not_one_path_component_are_refused(name: str) -> None:
    with pytest.raises(RequestRejected) as caught:
        upload_name(name)
    assert caught.value.status == 400


def test_upload_names_that_are_one_component_pass() -> None:
    assert upload_name("report (1).txt") == "report (1).txt"
    assert upload_name("naïve…") == "naïve…"


def test_attachment_names_the_file_safely() -> None:
    assert attachment("/a/b/x.txt") == "attachment; filename=\"x.txt\"; filename*=UTF-8''x.txt"
    header = attachment('/a/"\u00e9\\.txt')
    assert header == "attachment; filename=\"___.txt\"; filename*=UTF-8''%22%C3%A9%5C.txt"
    assert "\n" not in attachment("/a/x\ny")


def test_a_streamed_body_is_cut_at_the_cap() -> None:
    async def body(sizes: list[int]) -> AsyncIterator[bytes]:
        for size in sizes:
            yield b"x" * size

    async def total(sizes: list[int], limit: int) -> int:
        return sum([len(chunk) async for chunk in capped(body(sizes), limit)])

    assert asyncio.run(total([5, 5], 10)) == 10
    with pytest.raises(RequestRejected) as caught:
        asyncio.run(total([5, 5, 1], 10))
    assert caught.value.status == 413
