"""``--secret NAME=ENVVAR@HOST[,HOST]`` on exec, shell and run: the value comes from the environment."""

from __future__ import annotations

import argparse

import pytest

from capsa.cli._network import add_network_arguments, network_from_args, parse_secret
from capsa.errors import ConfigError


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_network_arguments(parser)
    return parser.parse_args(list(argv))


def test_a_secret_flag_binds_the_value_of_a_host_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_OPENAI", "sk-" + "v" * 40)
    network = network_from_args(
        _args("--secret", "OPENAI_API_KEY=MY_OPENAI@api.openai.com,*.openai.com")
    )
    assert network is not None
    [secret] = network.gateway.secrets
    assert secret.name == "OPENAI_API_KEY" and secret.value == "sk-" + "v" * 40
    assert secret.bound_to("api.openai.com", 443) and secret.bound_to("x.openai.com", 443)
    assert "v" * 40 not in repr(network)


@pytest.mark.parametrize("text", ["NAME", "NAME=VAR", "NAME=@host", "=VAR@host", "NAME=VAR@"])
def test_malformed_secret_flags_are_refused(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_secret(text, {"VAR": "value"})


def test_an_unset_variable_is_refused() -> None:
    with pytest.raises(ConfigError, match="not set"):
        parse_secret("NAME=MISSING@api.example.com", {})
