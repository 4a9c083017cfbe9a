"""The server's snapshot bookkeeping and list paging (no server, no VM)."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from starlette.datastructures import QueryParams

from capsa.server.entry import ApiError
from capsa.server.listing import page
from capsa.server.snapshots import Saved, SnapshotStore


def _saved(store: SnapshotStore, tenant: str, name: str | None = None) -> Saved:
    raw, path = store.new_path()
    path.mkdir()
    (path / "memory").write_bytes(b"x")
    saved = Saved(
        id=raw,
        name=name,
        tenant=tenant,
        template="base",
        source_id="i" + "0" * 20,
        path=path,
        envs={},
        created_at=datetime.datetime.now(datetime.UTC),
    )
    store.add(saved)
    return saved


def test_snapshots_belong_to_their_tenant() -> None:
    store = SnapshotStore()
    try:
        mine = _saved(store, "alpha", "nightly")
        assert store.find("nightly:default", "alpha") is mine
        assert store.find(mine.id, "alpha") is mine
        assert store.find(mine.snapshot_id, None) is mine  # admin keys see every tenant's
        assert store.find("nightly", "beta") is None
        assert store.find(mine.id, "beta") is None
        assert store.list("beta") == []
        assert store.delete("nightly", "beta") is False and mine.path.exists()
        # beta may use the same name: it names beta's own snapshot
        theirs = _saved(store, "beta", "nightly")
        assert store.find("nightly", "beta") is theirs and store.find("nightly", "alpha") is mine
    finally:
        store.close()


def test_a_name_moves_to_the_newest_and_delete_waits_for_restores() -> None:
    store = SnapshotStore()
    try:
        old = _saved(store, "alpha", "base-image")
        new = _saved(store, "alpha", "base-image")
        assert store.find("base-image", "alpha") is new
        assert store.find(old.id, "alpha") is old and old.name is None
        with store.using(new) as path:
            assert store.delete(new.snapshot_id, "alpha")
            assert path.exists()  # a restore still reads it
            assert store.find("base-image", "alpha") is None
        assert not new.path.exists()
        assert store.delete(old.id, "alpha") and not old.path.exists()
        root = old.path.parent
    finally:
        store.close()
    assert not root.exists()


def test_each_tenant_keeps_a_bounded_number() -> None:
    store = SnapshotStore(max_per_tenant=2)
    try:
        for _ in range(2):
            with store.reserving("alpha") as fits:
                assert fits
                _saved(store, "alpha")
        with store.reserving("alpha") as fits:
            assert not fits
        with store.reserving("beta") as fits, store.reserving("beta") as second:
            assert fits and second  # beta's places are its own; pending ones count too
            with store.reserving("beta") as third:
                assert not third
    finally:
        store.close()


def test_pages_follow_the_token_in_either_order() -> None:
    items = [f"{i:03d}" for i in range(7)]
    for descending in (False, True):
        seen: list[str] = []
        token: str | None = None
        while True:
            params = {"limit": "3", **({"nextToken": token} if token else {})}
            chosen, token = page(items, str, QueryParams(params), descending=descending)
            seen += chosen
            if token is None:
                break
        assert seen == sorted(items, reverse=descending)
    for bad in ({"limit": "0"}, {"limit": "101"}, {"limit": "x"}, {"nextToken": "!!"}):
        with pytest.raises(ApiError) as caught:
            page(items, str, QueryParams(bad))
        assert caught.value.status == 400


def test_removed_dirs_leave_nothing(tmp_path: Path) -> None:
    store = SnapshotStore()
    saved = _saved(store, "alpha")
    store.close()
    assert not saved.path.exists() and not saved.path.parent.exists()
