"""``Sandbox.list`` paging and filters, ``fork(count=N)`` and named snapshots through the real E2B
SDK (issue 24, items 6-8), on one server with two tenants and room for four sandboxes."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.server.conftest import API_KEY, Server, start_server

e2b = pytest.importorskip("e2b")

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]

KEY_A = f"alpha-{secrets.token_hex(16)}"
KEY_B = f"beta-{secrets.token_hex(16)}"
CAP = 4


def _sdk(server: Server, key: str = KEY_A) -> dict[str, Any]:
    return {"api_key": key, "api_url": server.url, "sandbox_url": server.url, "retries": 0}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("snapshots")
    keys = tmp / "keys.txt"
    keys.write_text(f"{KEY_A} tenant=alpha\n{KEY_B} tenant=beta\n")
    srv = start_server(
        tmp,
        *("--api-key-file", str(keys), "--memory", "256", "--max-sandboxes", str(CAP)),
        *("--pool", "base=1"),
    )
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def clean(server: Server) -> Iterator[None]:
    """Each test starts and ends with no sandbox held (so the cap is the test's own)."""
    yield
    for key in (KEY_A, KEY_B):
        for info in e2b.Sandbox.list(**_sdk(server, key)).next_items():
            e2b.Sandbox.kill(info.sandbox_id, **_sdk(server, key))


def _ids(paginator: Any) -> list[str]:
    ids = []
    while paginator.has_next:
        ids += [info.sandbox_id for info in paginator.next_items()]
    return ids


def test_list_pages_filters_and_order(server: Server, clean: None) -> None:
    tag = secrets.token_hex(4)
    made = [
        e2b.Sandbox.create(
            timeout=120, metadata={"suite": tag, "n": str(i), "odd key": "a b&c"}, **_sdk(server)
        )
        for i in range(3)
    ]
    ids = [s.sandbox_id for s in made]
    query = e2b.SandboxQuery(metadata={"suite": tag})

    paginator = e2b.Sandbox.list(query=query, limit=2, order="asc", **_sdk(server))
    first = paginator.next_items()
    assert [s.sandbox_id for s in first] == ids[:2]
    assert paginator.has_next and paginator.next_token
    assert [s.sandbox_id for s in paginator.next_items()] == ids[2:]
    assert not paginator.has_next
    assert _ids(e2b.Sandbox.list(query=query, limit=1, order="desc", **_sdk(server))) == ids[::-1]
    # metadata keys and values with spaces and '&' survive the SDK's double encoding
    odd = e2b.SandboxQuery(metadata={"odd key": "a b&c", "n": "1"})
    assert _ids(e2b.Sandbox.list(query=odd, **_sdk(server))) == [ids[1]]
    by_template = e2b.SandboxQuery(metadata={"suite": tag}, template="base")
    assert sorted(_ids(e2b.Sandbox.list(query=by_template, **_sdk(server)))) == sorted(ids)
    other = e2b.SandboxQuery(metadata={"suite": tag}, template="code-interpreter-v1")
    assert _ids(e2b.Sandbox.list(query=other, **_sdk(server))) == []

    made[0].pause()
    paused = e2b.SandboxQuery(metadata={"suite": tag}, state=[e2b.SandboxState.PAUSED])
    running = e2b.SandboxQuery(metadata={"suite": tag}, state=[e2b.SandboxState.RUNNING])
    assert _ids(e2b.Sandbox.list(query=paused, **_sdk(server))) == [ids[0]]
    assert sorted(_ids(e2b.Sandbox.list(query=running, **_sdk(server)))) == sorted(ids[1:])
    # E2B's v1 list has no pages: every sandbox in one reply
    v1 = httpx.get(f"{server.url}/sandboxes", params={"order": "asc"}, headers={"X-API-KEY": KEY_A})
    assert [s["sandboxID"] for s in v1.json()] == ids and "x-next-token" not in v1.headers
    # the other tenant sees none of them; bad queries are clear 400s
    assert _ids(e2b.Sandbox.list(query=query, **_sdk(server, KEY_B))) == []
    for params in ({"limit": "0"}, {"nextToken": "%%%"}, {"state": "sleeping"}, {"order": "up"}):
        reply = httpx.get(f"{server.url}/v2/sandboxes", params=params, headers={"X-API-KEY": KEY_A})
        assert reply.status_code == 400, (params, reply.text)


def test_fork_copies_and_keeps_the_parent(server: Server, clean: None) -> None:
    parent = e2b.Sandbox.create(timeout=300, envs={"WHO": "parent"}, **_sdk(server))
    parent.files.write("/home/user/state.txt", "before fork")
    before = parent.get_info()
    forks = parent.fork(count=2, timeout=120)
    assert len(forks) == 2 and all(isinstance(f, e2b.Sandbox) for f in forks), forks
    ids = {f.sandbox_id for f in forks} | {parent.sandbox_id}
    assert len(ids) == 3
    tokens = {f._envd_access_token for f in forks} | {parent._envd_access_token}
    assert len(tokens) == 3
    for i, fork in enumerate(forks):
        assert fork.files.read("/home/user/state.txt") == "before fork"
        fork.files.write("/home/user/state.txt", f"fork {i}")
        assert fork.commands.run("echo $WHO").stdout == "parent\n"
    assert [f.files.read("/home/user/state.txt") for f in forks] == ["fork 0", "fork 1"]
    assert parent.files.read("/home/user/state.txt") == "before fork"
    after = parent.get_info()
    assert after.sandbox_id == parent.sandbox_id and after.end_at == before.end_at
    assert parent.commands.run("echo alive").stdout == "alive\n"
    # a fork's timeout is its own (E2B's default for forks is 15 s; asked: 120 s)
    ends = [f.get_info().end_at for f in forks]
    assert all(end < before.end_at for end in ends)
    # another tenant cannot fork it; unknown ids are not found
    with pytest.raises(e2b.NotFoundException):
        e2b.Sandbox.fork(parent.sandbox_id, count=1, **_sdk(server, KEY_B))
    with pytest.raises(e2b.NotFoundException):
        e2b.Sandbox.fork("i" + "0" * 20, count=1, **_sdk(server))


def test_fork_past_the_cap_fails_alone(server: Server, clean: None) -> None:
    """With one slot left, fork(count=2) starts one fork and reports 429 for the other; a full
    server refuses fork, create and create-from-snapshot with 429, and a paused parent cannot be
    forked; nothing is left holding a slot afterwards."""
    parent = e2b.Sandbox.create(timeout=300, **_sdk(server))
    snapshot = parent.create_snapshot()
    fillers = [e2b.Sandbox.create(timeout=120, **_sdk(server)) for _ in range(CAP - 2)]
    results = parent.fork(count=2, timeout=60)
    assert len(results) == 2
    started = [r for r in results if isinstance(r, e2b.Sandbox)]
    failed = [r for r in results if isinstance(r, Exception)]
    assert len(started) == 1 and len(failed) == 1, results
    assert isinstance(failed[0], e2b.RateLimitException), failed
    assert started[0].commands.run("echo forked").stdout == "forked\n"
    with pytest.raises(e2b.RateLimitException):
        parent.fork(count=1)
    with pytest.raises(e2b.RateLimitException):
        e2b.Sandbox.create(timeout=60, **_sdk(server))
    with pytest.raises(e2b.RateLimitException):
        e2b.Sandbox.create(snapshot.snapshot_id, timeout=60, **_sdk(server))
    fillers[0].pause()
    with pytest.raises(e2b.SandboxException, match="paused"):
        fillers[0].fork(count=1)
    with pytest.raises(e2b.SandboxException, match="paused"):
        fillers[0].create_snapshot()
    for sandbox in (parent, started[0], *fillers):
        sandbox.kill()
    e2b.Sandbox.delete_snapshot(snapshot.snapshot_id, **_sdk(server))
    assert _ids(e2b.Sandbox.list(**_sdk(server))) == []
    # every slot came back: the cap's worth of forks start
    again = e2b.Sandbox.create(timeout=120, **_sdk(server))
    forks = again.fork(count=CAP - 1, timeout=60)
    assert all(isinstance(f, e2b.Sandbox) for f in forks), forks


def test_snapshot_outlives_its_source(server: Server, clean: None) -> None:
    source = e2b.Sandbox.create(timeout=300, envs={"WHO": "source"}, **_sdk(server))
    source.files.write("/home/user/saved.txt", "in the snapshot")
    end = source.get_info().end_at
    info = source.create_snapshot("nightly")
    assert info.snapshot_id == "nightly:default" and info.names == ["nightly:default"]
    # the source keeps running, with its id and end
    assert source.commands.run("echo still here").stdout == "still here\n"
    assert source.get_info().end_at == end
    source.files.write("/home/user/saved.txt", "after the snapshot")
    unnamed = source.create_snapshot()
    listed = [s.snapshot_id for s in e2b.Sandbox.list_snapshots(**_sdk(server)).next_items()]
    assert info.snapshot_id in listed and unnamed.snapshot_id in listed
    mine = source.list_snapshots(limit=1)
    assert len(mine.next_items()) == 1 and mine.has_next
    assert len(mine.next_items()) == 1 and not mine.has_next
    source.kill()

    copy = e2b.Sandbox.create(info.snapshot_id, timeout=120, **_sdk(server))
    assert copy.files.read("/home/user/saved.txt") == "in the snapshot"
    assert copy.commands.run("echo $WHO").stdout == "source\n"
    later = e2b.Sandbox.create(unnamed.snapshot_id, timeout=120, **_sdk(server))
    assert later.files.read("/home/user/saved.txt") == "after the snapshot"
    assert copy.sandbox_id != later.sandbox_id

    # tenant beta neither sees, uses nor deletes alpha's snapshots
    beta = _sdk(server, KEY_B)
    assert e2b.Sandbox.list_snapshots(**beta).next_items() == []
    with pytest.raises(e2b.SandboxException):
        e2b.Sandbox.create(info.snapshot_id, timeout=60, **beta)
    assert e2b.Sandbox.delete_snapshot(info.snapshot_id, **beta) is False
    with pytest.raises(e2b.NotFoundException):
        e2b.Sandbox.create_snapshot(copy.sandbox_id, **beta)

    assert e2b.Sandbox.delete_snapshot(info.snapshot_id, **_sdk(server)) is True
    assert e2b.Sandbox.delete_snapshot(info.snapshot_id, **_sdk(server)) is False
    assert e2b.Sandbox.delete_snapshot(unnamed.snapshot_id, **_sdk(server)) is True
    assert e2b.Sandbox.list_snapshots(**_sdk(server)).next_items() == []
    with pytest.raises(e2b.SandboxException):
        e2b.Sandbox.create(info.snapshot_id, timeout=60, **_sdk(server))
    # the sandboxes made from it do not need it
    assert copy.files.read("/home/user/saved.txt") == "in the snapshot"
    with pytest.raises(e2b.NotFoundException):
        e2b.Sandbox.create_snapshot("i" + "0" * 20, **_sdk(server))
    reply = httpx.delete(f"{server.url}/templates/base", headers={"X-API-KEY": API_KEY})
    assert reply.status_code == 501 and "deleting templates" in reply.text


def test_bad_fork_and_snapshot_requests_are_clear_4xx(server: Server) -> None:
    """Malformed counts, timeouts, names and queries are refused before anything is saved, with the
    same answer for a known and an unknown sandbox id."""
    hdr = {"X-API-KEY": KEY_A}
    unknown = "i" + "0" * 20
    for body in ({"count": 0}, {"count": 21}, {"count": "2"}, {"count": True}, {"timeout": -1}):
        reply = httpx.post(f"{server.url}/sandboxes/{unknown}/fork", json=body, headers=hdr)
        assert reply.status_code == 400, (body, reply.text)
    for body, status in (
        ({"name": "Bad Name"}, 400),
        ({"name": "x" * 80}, 400),
        ({"name": "base"}, 409),
    ):
        reply = httpx.post(f"{server.url}/sandboxes/{unknown}/snapshots", json=body, headers=hdr)
        assert reply.status_code == status, (body, reply.text)
    reply = httpx.post(f"{server.url}/sandboxes/{unknown}/snapshots", json={}, headers=hdr)
    assert reply.status_code == 404
    for params in ({"limit": "0"}, {"limit": "1000"}, {"nextToken": "!!"}):
        reply = httpx.get(f"{server.url}/snapshots", params=params, headers=hdr)
        assert reply.status_code == 400, (params, reply.text)
    reply = httpx.delete(f"{server.url}/templates/no-such-snapshot:default", headers=hdr)
    assert reply.status_code == 404
    assert httpx.get(f"{server.url}/snapshots", headers={"X-API-KEY": "wrong"}).status_code == 401
