"""Which guest account an envd request acts as (``capsa.server.accounts``), without a VM."""

from __future__ import annotations

import asyncio
import base64

import pytest

pytest.importorskip("starlette")

from capsa.errors import UnknownUserError
from capsa.server import accounts
from capsa.server.connect import ConnectError


def _basic(text: str) -> str:
    return "Basic " + base64.b64encode(text.encode()).decode()


def test_the_sdk_names_an_account_in_basic_authorization_or_the_query() -> None:
    assert accounts.from_authorization(_basic("root:")) == "root"
    assert accounts.from_authorization(_basic("user:")) == "user"
    assert accounts.from_authorization(None) is None
    assert accounts.from_authorization("Bearer abc") is None  # not an account
    assert accounts.from_query("root") == "root"
    assert accounts.from_query(None) is None and accounts.from_query("") is None
    for bad in ("Basic !!!", _basic(":"), _basic("a/b:"), _basic("x" * 300 + ":"), _basic("tab\t:")):
        with pytest.raises(ConnectError) as info:
            accounts.from_authorization(bad)
        assert info.value.code == "unauthenticated"
    assert (accounts.home_of(None), accounts.home_of("root")) == ("/home/user", "/root")
    assert accounts.home_of("app") == "/home/app"


def test_no_account_named_is_user_else_the_agent_default() -> None:
    calls: list[str | None] = []

    async def call(user: str | None, known: frozenset[str]) -> str:
        calls.append(user)
        if user is not None and user not in known:
            raise UnknownUserError(f"no {user}", user=user)
        return user or "default"

    async def main() -> None:
        with_user = frozenset({"user", "root"})
        assert await accounts.as_account(None, lambda u: call(u, with_user)) == "user"
        assert await accounts.as_account(None, lambda u: call(u, frozenset())) == "default"
        assert await accounts.as_account("root", lambda u: call(u, with_user)) == "root"
        with pytest.raises(UnknownUserError):  # an account the SDK named is never substituted
            await accounts.as_account("user", lambda u: call(u, frozenset()))

    asyncio.run(main())
    assert calls == ["user", "user", None, "root", "user"]
    error = accounts.unknown_user(UnknownUserError("x", user="bob"))
    assert (error.code, error.message) == ("unauthenticated", "invalid username: 'bob'")
