"""``capsa serve`` argument handling (no server started)."""

from __future__ import annotations

from pathlib import Path

import pytest

from capsa.cli import build_parser, main
from capsa.cli._sandbox_flags import parse_pool
from capsa.cli.serve import load_keys
from capsa.errors import ConfigError


def test_pool_flags() -> None:
    assert parse_pool("base=4") == ("base", 4)
    for bad in ("base", "base=0", "=2", "base=x"):
        with pytest.raises(ConfigError):
            parse_pool(bad)


def test_keys_come_from_the_file_and_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = tmp_path / "keys"
    keys.write_text("one\n\n  two  \n")
    monkeypatch.setenv("CAPSA_API_KEY", "three")
    ring = load_keys(str(keys))
    assert [(k.key, k.tenant, k.admin) for k in ring.keys] == [
        ("one", "default", False),
        ("two", "default", False),
        ("three", "default", True),
    ]
    monkeypatch.delenv("CAPSA_API_KEY")
    with pytest.raises(ConfigError, match="no API key"):
        load_keys(None)
    with pytest.raises(ConfigError, match="cannot read"):
        load_keys(str(tmp_path / "missing"))


def test_defaults_bind_loopback_port_3000() -> None:
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.pool, args.max_sandboxes) == ("127.0.0.1", 3000, [], None)


def test_refuses_to_start_without_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CAPSA_API_KEY", raising=False)
    assert main(["serve", "--port", "1"]) == 2


def test_mcp_flags_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(
        ["mcp", "--pool", "base=2", "--max-sandboxes", "3", "--memory", "256"]
    )
    assert (args.pool, args.max_sandboxes, args.memory) == (["base=2"], 3, 256)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["mcp", "--help"])
    text = capsys.readouterr().out
    for flag in ("--pool", "--max-sandboxes", "--dns-server", "--allow-internal-destinations"):
        assert flag in text
    assert "mcpServers" in text
    assert main(["mcp", "--pool", "nosuch=1"]) == 2  # refused before reading stdin


def test_ray_flag_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    """``--ray ADDRESS`` (off by default) and the help text that explains it."""
    assert build_parser().parse_args(["serve"]).ray is None
    args = build_parser().parse_args(["serve", "--ray", "10.0.0.1:6379", "--pool", "base=2"])
    assert (args.ray, args.pool) == ("10.0.0.1:6379", ["base=2"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = capsys.readouterr().out
    assert "--ray ADDRESS" in text and "capsa_slots" in text and "per node" in text
