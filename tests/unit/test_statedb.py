"""The state dir of ``capsa serve`` without a server: the lock, refusals (newer schema, corrupt or
truncated database), the start-up sweep, end records and the policy round trip."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("starlette")

from capsa.errors import ConfigError
from capsa.net.policy import Action, Cidr, Domain, NetworkPolicy, Rule
from capsa.server.durable import policy_json, policy_of
from capsa.server.statedb import DB_NAME, SCHEMA_VERSION, StateDB, read_ends

REPO = Path(__file__).resolve().parents[2]


def _end(reason: str, tenant: str = "default") -> dict[str, object]:
    now = time.time()
    return {"tenant": tenant, "template": "base", "reason": reason, "detail": "",
            "started": now - 5, "ended": now, "metadata": {"k": "v"}}  # fmt: skip


def test_a_second_holder_is_refused_naming_the_first_pid(tmp_path: Path) -> None:
    first = StateDB(tmp_path / "s")
    try:
        with pytest.raises(ConfigError, match=f"in use by another capsa serve \\(pid {os.getpid()}\\)"):
            StateDB(tmp_path / "s")
    finally:
        first.close()
    StateDB(tmp_path / "s").close()  # released: the next one gets it


def test_a_database_of_a_newer_schema_is_refused(tmp_path: Path) -> None:
    StateDB(tmp_path).close()
    with sqlite3.connect(tmp_path / DB_NAME) as db:
        db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    with pytest.raises(ConfigError, match="written by a newer capsa") as caught:
        StateDB(tmp_path)
    assert caught.value.hint is not None and "newer capsa" in caught.value.hint


def _filled(root: Path) -> None:
    state = StateDB(root)
    for n in range(200):
        state.db.execute(
            "INSERT INTO ends VALUES (?, 't', 'base', 'killed', ?, 0, 0, '{}')", (f"i{n}", "x" * 500)
        )
    state.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    state.close()


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_corrupt_or_truncated_database_is_refused_with_how_to_recover(
    tmp_path: Path, damage: str
) -> None:
    _filled(tmp_path)
    path = tmp_path / DB_NAME
    size = path.stat().st_size
    if damage == "garbage":
        path.write_bytes(b"this is not a database" * 100)
    else:
        with path.open("r+b") as handle:
            handle.truncate(size // 3)
    with pytest.raises(ConfigError, match="corrupt or truncated") as caught:
        StateDB(tmp_path)
    assert caught.value.hint is not None and ".recover" in caught.value.hint
    assert path.stat().st_size == (size // 3 if damage == "truncated" else 2200)  # left as it was


def test_the_cli_refuses_a_corrupt_database_with_exit_2(tmp_path: Path) -> None:
    (tmp_path / DB_NAME).write_bytes(b"\0garbage" * 512)
    done = subprocess.run(
        [sys.executable, "-m", "capsa.cli", "serve", "--port", "1", "--state-dir", str(tmp_path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={**os.environ, "CAPSA_API_KEY": "k" * 20},
    )
    assert done.returncode == 2, done.stderr
    assert "corrupt or truncated" in done.stderr and "hint:" in done.stderr


def test_the_sweep_removes_what_no_row_points_at(tmp_path: Path) -> None:
    state = StateDB(tmp_path)
    kept = state.paused_root / "ikept"
    kept.mkdir()
    (kept / "snapshot.json").write_text("{}")
    record = {"tenant": "t", "template": "base"}
    state.put_sandbox("ikept", state="paused", directory=kept, record=record)
    snap = state.snapshots_root / "sdone"
    snap.mkdir()
    state.put_snapshot("sdone", "t", snap, {})
    orphans = [state.paused_root / "igone", state.snapshots_root / "shalf.partial"]
    for orphan in orphans:
        orphan.mkdir()
        (orphan / "memory").write_bytes(b"x")
    assert state.sweep() == 2
    assert kept.is_dir() and snap.is_dir()
    assert not any(o.exists() for o in orphans)
    state.close()


def test_ends_are_kept_per_tenant_and_pruned(tmp_path: Path) -> None:
    state = StateDB(tmp_path)
    state.put_sandbox("ia", state="running", directory=None, record={"tenant": "a", "template": "base"})
    state.end_sandbox("ia", _end("server_crashed", "a"))
    state.end_sandbox("ib", _end("killed", "b"))
    assert state.sandboxes() == []
    assert [r["sandboxID"] for r in state.ends("a")] == ["ia"]
    assert {r["reason"] for r in state.ends(None)} == {"server_crashed", "killed"}
    assert read_ends(tmp_path, "b")[0]["metadata"] == {"k": "v"}  # a reader beside the holder
    assert state.prune_ends(time.time() + 1) == 2
    state.close()


def test_a_server_policy_round_trips() -> None:
    policy = NetworkPolicy(
        Action.DENY, [Rule(Action.ALLOW, Domain("*.example.com")), Rule(Action.DENY, Cidr("10.0.0.0/8"))]
    )
    assert policy_of(policy_json(policy)) == policy
    assert policy_of(policy_json(None)) is None
