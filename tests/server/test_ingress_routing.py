"""Which requests are ingress (``get_host``): the ``Host`` pattern and the sandbox headers."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("starlette")

from capsa.server.ingress import Ingress, parse_host
from capsa.server.limits import Limits


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("8000-iabc123.localhost:3000", ("iabc123", 8000)),
        ("8000-IABC123.LOCALHOST:3000", ("iabc123", 8000)),  # hosts are case-insensitive
        ("65535-iabc.localhost:3000", ("iabc", 65535)),
        ("0-iabc.localhost:3000", None),
        ("65536-iabc.localhost:3000", None),
        ("123456-iabc.localhost:3000", None),
        ("8000-iabc.localhost:3001", None),  # another domain
        ("8000-iabc.evil.localhost:3000", None),  # the id is one label
        ("8000-i-abc.localhost:3000", None),
        ("x8000-iabc.localhost:3000", None),
        ("localhost:3000", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_host(host: str | None, expected: tuple[str, int] | None) -> None:
    assert parse_host(host, "localhost:3000") == expected


def _scope(**headers: str) -> dict[str, Any]:
    raw = [(k.lower().replace("_", "-").encode(), v.encode()) for k, v in headers.items()]
    return {"type": "http", "headers": raw}


def test_route_by_host_then_by_headers() -> None:
    ingress = Ingress(registry=None, limits=Limits(), domain="sb.example:443")  # type: ignore[arg-type]
    assert ingress.route(_scope(host="80-iab.sb.example:443"), None) == ("iab", 80)
    by_headers = _scope(host="127.0.0.1:3000", e2b_sandbox_port="8080")
    assert ingress.route(by_headers, "iab") == ("iab", 8080)
    for port in ("49983", "49999", "0", "70000", "80x", "-1"):  # envd, interpreter, nonsense
        assert ingress.route(_scope(e2b_sandbox_port=port), "iab") is None
    assert ingress.route(_scope(), "iab") is None  # envd by default
    assert ingress.route(_scope(host="127.0.0.1:3000"), None) is None  # the control plane
