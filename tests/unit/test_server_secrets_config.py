"""``capsa serve --secrets-file``: what the file may say, and which secrets a create gets."""

from __future__ import annotations

from pathlib import Path

import pytest

from capsa import NetworkPolicy
from capsa.errors import ConfigError
from capsa.server.entry import ApiError
from capsa.server.server_secrets import ServerSecrets, secrets_policy, transforms

GOOD = """
[KEY]
env = "MY_KEY"
hosts = ["api.example.com"]
tenants = ["blue"]

[HDR]
value = "Bearer abc"
hosts = ["*.example.org"]
header = "Authorization"
templates = ["base"]
"""


def _load(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> ServerSecrets:
    path = tmp_path / "secrets.toml"
    path.write_text(text)
    return ServerSecrets.load(path, (), {"MY_KEY": "sk-value-123"} if environ is None else environ)


def test_a_create_gets_its_templates_secrets_and_those_it_asks_for(tmp_path: Path) -> None:
    offered = _load(tmp_path, GOOD)
    assert "sk-value" not in repr(offered.offered)
    assert offered.names_for(None, "base", "red") == (("HDR",), ())
    assert offered.names_for(["KEY"], "other", "blue") == ((), ("KEY",))
    assert offered.names_for(["HDR"], "base", "blue") == ((), ("HDR",))
    with pytest.raises(ApiError) as refused:
        offered.names_for(["KEY"], "base", "red")
    assert refused.value.status == 403
    with pytest.raises(ApiError) as unknown:
        offered.names_for(["NOPE"], "base", "red")
    assert unknown.value.status == 400 and "offers you: HDR" in unknown.value.message


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('[K]\nhosts = ["a.test"]\n', "exactly one of value or env"),
        ('[K]\nvalue = "v"\nenv = "E"\nhosts = ["a.test"]\n', "exactly one of value or env"),
        ('[K]\nenv = "UNSET"\nhosts = ["a.test"]\n', "not set"),
        ('[K]\nvalue = "v"\nhosts = ["a.test"]\ncolour = 1\n', "unknown keys"),
        ('[K]\nvalue = "v"\nhosts = []\n', "non-empty list of hosts"),
        ('[K]\nvalue = "v"\nhosts = ["a.test"]\nheader = "Host"\n', "frames or routes"),
        ('[K-1]\nvalue = "v"\nhosts = ["a.test"]\n', "environment variable name"),
        ("[K\n", "secrets file"),
    ],
)
def test_a_bad_secrets_file_is_refused_at_start(tmp_path: Path, text: str, words: str) -> None:
    with pytest.raises(ConfigError) as refused:
        _load(tmp_path, text, {})
    assert words in refused.value.message


def test_rules_without_network_settings_reach_their_hosts_alone() -> None:
    rules = transforms({"rules": {"API.example.com.": [{"transform": {"headers": {"X-A": "v"}}}]}})
    policy, _ = secrets_policy(None, rules, None)
    assert policy is not None
    assert policy.decide_name("api.example.com").allowed
    assert not policy.decide_name("other.example.com").allowed
    with pytest.raises(ApiError):  # allow_internet_access=False and nothing allowed
        secrets_policy(None, rules, False)


def test_a_templates_secret_the_create_cannot_reach_is_left_out(tmp_path: Path) -> None:
    (hdr,) = _load(tmp_path, GOOD).resolve(("HDR",))
    assert secrets_policy(None, (), False, (hdr,)) == (None, ())  # no network: still poolable
    own = NetworkPolicy.deny_all().allow_domain("pypi.org")
    assert secrets_policy(own, (), None, (hdr,)) == (own, ())
    policy, kept = secrets_policy(None, (), None, (hdr,))
    assert kept == (hdr,) and policy is not None and policy.decide_name("x.example.org").allowed
