"""Which requests are ingress (``get_host``): the ``Host`` pattern and the sandbox headers."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("starlette")

from capsa.server.entry import ApiError
from capsa.server.ingress import Ingress, parse_host, with_host_routing
from capsa.server.limits import Limits, RequestRejected
from capsa.server.network import check_network, mask_request_host


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


def test_envd_and_interpreter_hosts_route_to_the_sandbox_api() -> None:
    """``49983-{id}.{domain}`` is envd of that sandbox (the SDKs' URL without E2B_SANDBOX_URL):
    not ingress, and the routing headers come from the host; headers that disagree are a 400."""
    ingress = Ingress(registry=None, limits=Limits(), domain="sb.example:443")  # type: ignore[arg-type]
    envd = _scope(host="49983-iab.sb.example:443")
    assert ingress.route(envd, None) is None
    routed = dict(with_host_routing(envd, "sb.example:443")["headers"])
    assert (routed[b"e2b-sandbox-id"], routed[b"e2b-sandbox-port"]) == (b"iab", b"49983")
    same = _scope(host="49999-iab.sb.example:443", e2b_sandbox_id="iab", e2b_sandbox_port="49999")
    assert with_host_routing(same, "sb.example:443")["headers"] == same["headers"]
    other = _scope(host="49983-iab.sb.example:443", e2b_sandbox_id="ixy")
    with pytest.raises(RequestRejected) as caught:
        with_host_routing(other, "sb.example:443")
    assert caught.value.status == 400
    port = _scope(host="8000-iab.sb.example:443")  # an ingress host is left alone
    assert with_host_routing(port, "sb.example:443") is port


@pytest.mark.parametrize(
    ("mask", "ok"),
    [
        ("custom-host.example.com:${PORT}", True),
        ("${PORT}-app.example.com", True),
        ("[::1]:8080", True),
        ("evil.example\r\nX-Injected: 1", False),
        ("a b", False),
        ("", False),
        ("x" * 300, False),
        (42, False),
    ],
)
def test_mask_request_host_values(mask: object, ok: bool) -> None:
    if ok:
        assert mask_request_host({"mask_request_host": mask}) == mask
        assert mask_request_host({"maskRequestHost": mask}) == mask  # the API's spelling
    else:
        with pytest.raises(ApiError) as caught:
            check_network(None, {"maskRequestHost": mask})
        assert caught.value.status == 400
    assert mask_request_host({}) is None
