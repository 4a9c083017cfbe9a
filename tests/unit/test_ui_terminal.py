"""The dashboard terminal's checks that need no sandbox: the WebSocket's Origin against its Host,
and the control frames and sizes it accepts."""

from __future__ import annotations

import pytest
from starlette.websockets import WebSocket

from capsa.server.ui.terminal import FrameRefused, parse_control, query_size, same_origin


def _ws(headers: dict[str, str]) -> WebSocket:
    scope = {
        "type": "websocket",
        "path": "/ui/api/sandboxes/x/terminal",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }

    async def never() -> dict[str, str]:
        raise AssertionError("not used")

    return WebSocket(scope, never, never)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("origin", "host", "same"),
    [
        ("http://127.0.0.1:3000", "127.0.0.1:3000", True),
        ("https://capsa.example", "capsa.example", True),
        ("https://capsa.example:443", "capsa.example", True),
        ("http://capsa.example", "capsa.example:80", True),
        ("http://127.0.0.1:3001", "127.0.0.1:3000", False),
        ("http://8000-isbx.capsa.example", "capsa.example", False),  # a sandbox's port, same site
        ("http://capsa.example.evil.test", "capsa.example", False),
        ("null", "capsa.example", False),
        ("file://", "capsa.example", False),
        ("", "capsa.example", False),
        (None, "capsa.example", False),
    ],
)
def test_only_a_page_of_the_same_host_may_open_a_terminal(
    origin: str | None, host: str, same: bool
) -> None:
    headers = {"host": host} if origin is None else {"host": host, "origin": origin}
    assert same_origin(_ws(headers)) is same


def test_resize_is_the_only_control_frame() -> None:
    assert parse_control('{"type": "resize", "rows": 40, "cols": 120}') == (40, 120)
    for bad in (
        "[]",
        "resize",
        '{"type": "resize", "rows": 40}',
        '{"type": "resize", "rows": 40, "cols": 120, "x": 1}',
        '{"type": "resize", "rows": 40.0, "cols": 120}',
        '{"type": "resize", "rows": "40", "cols": 120}',
        '{"type": "resize", "rows": 10001, "cols": 120}',
        '{"type": "Resize", "rows": 40, "cols": 120}',
    ):
        with pytest.raises(FrameRefused):
            parse_control(bad)
    with pytest.raises(FrameRefused) as caught:
        parse_control(" " * 2000)
    assert caught.value.code == 1009


def test_the_initial_size_comes_from_the_query_or_defaults() -> None:
    assert query_size({}) == (24, 80)
    assert query_size({"rows": "50", "cols": "200"}) == (50, 200)
    for rows, cols in (("0", "80"), ("-1", "80"), ("24", "1e3"), ("24", "9" * 7)):
        with pytest.raises(FrameRefused):
            query_size({"rows": rows, "cols": cols})
