"""API key files with tenants, the per-tenant and global sandbox quota, and the default
``--max-sandboxes`` (no server, no VM)."""

from __future__ import annotations

import argparse
import logging

import pytest

from capsa.cli._sandbox_flags import max_sandboxes
from capsa.errors import ConfigError
from capsa.server.quota import LimitReached, Quota, TenantLimits, machine_max_sandboxes
from capsa.server.tenants import ApiKey, KeyRing, Principal, key_ring, parse_key_file

KEY_A = "a" * 32
KEY_B = "b" * 32


def test_plain_lines_are_the_default_tenant_and_options_name_others() -> None:
    text = f"""
# operators
{KEY_A}
{KEY_B} tenant=team-b max_sandboxes=3 creates_per_minute=10
{"c" * 32} tenant=team-b
{"d" * 32} tenant=ops admin
"""
    keys, limits = parse_key_file(text, "keys.txt")
    assert [(n, k.tenant, k.admin) for n, k in keys] == [
        (3, "default", False),
        (4, "team-b", False),
        (5, "team-b", False),
        (6, "ops", True),
    ]
    assert limits == {"team-b": TenantLimits(max_sandboxes=3, creates_per_minute=10)}
    assert KEY_A not in repr(keys[0][1])  # keys stay out of logs and tracebacks


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (f"{KEY_A}\n{KEY_A} tenant=x", "line 2: the same key as on line 1"),
        (f"{KEY_A} tenant=", "line 1: bad tenant name"),
        (f"{KEY_A} tenant=-x", "line 1: bad tenant name"),
        (f"{KEY_A} tenant=a/b", "line 1: bad tenant name"),
        (f"\n{KEY_A} max_sandboxes=0", "line 2: max_sandboxes must be a number"),
        (f"{KEY_A} creates_per_minute=x", "line 1: creates_per_minute must be a number"),
        (f"{KEY_A} admin=yes", "line 1: unknown option 'admin=yes'"),
        (f"{KEY_A} tenant=t max_sandboxes=2\n{KEY_B} tenant=t max_sandboxes=3", "line 2: max_sandb"),
        ("k\u00e9y-with-latin-1-chars-0123", "line 1: the key has characters"),
    ],
)
def test_bad_lines_are_refused_with_their_line_number(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_key_file(text, "keys.txt")


def test_the_environment_key_is_an_admin_of_the_default_tenant(caplog: pytest.LogCaptureFixture) -> None:
    ring = key_ring([ApiKey(KEY_A, "team-a")], {}, KEY_B)
    assert ring.principal(KEY_B) == Principal("default", admin=True)
    assert ring.principal(KEY_A) == Principal("team-a", admin=False)
    assert ring.principal(KEY_A).scope == "team-a"  # type: ignore[union-attr]
    assert ring.principal(KEY_B).scope is None  # type: ignore[union-attr]
    for wrong in (None, "", KEY_A[:-1], KEY_A + "a", "x"):
        assert ring.principal(wrong) is None
    with pytest.raises(ConfigError, match="also in the API key file"):
        key_ring([ApiKey(KEY_A, "team-a")], {}, KEY_A)
    with pytest.raises(ConfigError, match="no API key"):
        key_ring([], {}, None)
    with caplog.at_level(logging.WARNING):
        assert KeyRing.single("short").principal("short") == Principal("default", admin=True)
        key_ring([], {}, "short")
    assert "short key" in caplog.text


def test_quota_checks_and_takes_a_slot_in_one_step() -> None:
    now = [0.0]
    quota = Quota(3, {"t": TenantLimits(max_sandboxes=2, creates_per_minute=3)}, clock=lambda: now[0])
    quota.reserve("t")
    quota.reserve("t")
    with pytest.raises(LimitReached, match="tenant 't' may hold at most 2 sandboxes"):
        quota.reserve("t")
    quota.reserve("other")
    with pytest.raises(LimitReached, match=r"at most 3 sandboxes \(--max-sandboxes\)"):
        quota.reserve("other")
    assert (quota.held(), quota.held("t"), quota.held("other")) == (3, 2, 1)
    quota.release("t")
    quota.release("other")
    quota.reserve("t")  # the third create of t within the minute
    quota.release("t")
    with pytest.raises(LimitReached, match=r"at most 3 sandboxes per minute.*retry in 60 s"):
        quota.reserve("t")
    now[0] = 60.0
    quota.reserve("t")
    quota.release("nobody")  # logged, not counted
    assert quota.held() == 2


def test_paused_sandboxes_give_back_their_running_slot() -> None:
    """A pause turns a running slot into a paused one (as many as running ones); a resume takes a
    running slot again, or is refused when they are all taken; the tenant's cap counts both."""
    quota = Quota(2, {"t": TenantLimits(max_sandboxes=3)})
    quota.reserve("t")
    quota.reserve("t")
    quota.park()  # one of them paused: room for another running one
    quota.reserve("t")
    assert (quota.held(), quota.paused, quota.held("t")) == (2, 1, 3)
    with pytest.raises(LimitReached, match="tenant 't' may hold at most 3"):
        quota.reserve("t")
    with pytest.raises(LimitReached, match="no room to resume"):
        quota.unpark()
    quota.park()
    with pytest.raises(LimitReached, match="at most 2 paused sandboxes"):
        quota.park()
    quota.unpark()
    quota.release("t", paused=True)  # a paused one removed
    quota.release("t")
    assert (quota.held(), quota.paused, quota.held("t")) == (1, 0, 1)


def test_the_default_cap_fits_memory_and_cores() -> None:
    assert machine_max_sandboxes(512, available_mb=24 * 1024, cores=2)[0] == 16  # cores bind
    chosen, why = machine_max_sandboxes(512, 2, available_mb=4096, cores=16)
    assert chosen == 4096 * 8 // 10 // (512 + 160) - 2  # memory binds, pools deducted
    assert "4096 MiB" in why and "2 pooled" in why
    assert machine_max_sandboxes(4096, available_mb=1024, cores=1)[0] == 1  # never below 1
    args = argparse.Namespace(max_sandboxes=None, ray=None, pool=["base=2"], memory=256)
    assert max_sandboxes(args) == machine_max_sandboxes(256, 2)[0]
    assert max_sandboxes(argparse.Namespace(max_sandboxes=None, ray="auto", pool=[], memory=256)) is None
    with pytest.raises(ConfigError, match="at least 1"):
        max_sandboxes(argparse.Namespace(max_sandboxes=0, ray=None, pool=[], memory=256))
