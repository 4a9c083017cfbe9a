"""CLI flag parsing without a VM."""

from __future__ import annotations

import pytest

from capsa.cli._network import parse_forward
from capsa.errors import ConfigError


def test_forward_flags() -> None:
    assert parse_forward("8080:80") == ("tcp", 8080, 80)
    assert parse_forward("tcp:8080:80") == ("tcp", 8080, 80)
    assert parse_forward("udp:5353:53") == ("udp", 5353, 53)
    for bad in ("80", "sctp:1:2", "a:b", "udp:1", "1:2:3:4", ":80", "udp::53"):
        with pytest.raises(ConfigError):
            parse_forward(bad)
