"""Attacks on volumes (issue 25 item 5): hostile names, a guest filling or corrupting a volume's
filesystem, symlinks and ``..`` in the content API, oversize writes. The host never parses a
volume's filesystem, a volume never grows past its size, and no path leads out of it."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import capsa
from tests.conftest import SandboxFactory
from tests.server.conftest import Server, start_server

pytestmark = [pytest.mark.vm]

KEY = f"vol-{secrets.token_hex(16)}"
HOSTILE_NAMES = ["../escape", "a/b", "..", ".hidden", "a\0b", "x" * 65, "", "a..b", "/abs", "é"]


def test_hostile_names_never_touch_the_host(tmp_path: Path) -> None:
    store = tmp_path / "store"
    for name in HOSTILE_NAMES:
        with pytest.raises(capsa.VolumeError):
            capsa.volume(name, size_mb=16, root=store)
    assert not (tmp_path / "escape.ext4").exists()
    assert not store.exists() or not any(store.iterdir())


async def _sh(vm: capsa.Sandbox, script: str) -> capsa.ExecResult:
    return await vm.agent.exec("sh").args(["-c", script]).timeout(120).run()


@pytest.mark.asyncio
@pytest.mark.timeout(300)
async def test_a_guest_filling_the_volume_gets_enospc_and_the_host_nothing(
    tmp_path: Path, sandbox_factory: SandboxFactory
) -> None:
    vol = capsa.volume("fill", size_mb=16, root=tmp_path)
    vm = await sandbox_factory(capsa.sandbox().volume(vol, "/data"))
    # Many files and one big one: both are stopped by the filesystem, inside the guest.
    result = await _sh(
        vm,
        "i=0; while [ $i -lt 3000 ]; do echo x > /data/f$i || break; i=$((i+1)); done; "
        "dd if=/dev/zero of=/data/big bs=1M count=100 2>&1; sync; echo done",
    )
    assert "No space left on device" in result.stdout, result.stdout[-500:]
    assert vol.path.stat().st_size == 16 << 20
    assert vol.path.stat().st_blocks * 512 <= 17 << 20


@pytest.mark.asyncio
@pytest.mark.timeout(300)
async def test_a_corrupted_volume_fails_to_mount_cleanly(
    tmp_path: Path, sandbox_factory: SandboxFactory
) -> None:
    """Guest root overwrites the raw disk (superblock and metadata) under the mounted filesystem.
    The next sandbox gets a clear VolumeError (or a filesystem its kernel refuses to trust); the host
    never reads the image's structures, and the image stays its size."""
    vol = capsa.volume("corrupt", size_mb=16, root=tmp_path)
    vm = await sandbox_factory(capsa.sandbox().volume(vol, "/data"))
    wreck = await _sh(
        vm,
        'for d in /sys/block/vd*; do [ "$(cat $d/serial)" = capsa-vol-0 ] && dev=/dev/${d##*/}; done; '
        "dd if=/dev/urandom of=$dev bs=1k count=64 conv=notrunc,fsync 2>&1; echo wrote",
    )
    assert "wrote" in wreck.stdout
    await vm.kill()
    assert vol.path.stat().st_size == 16 << 20
    with pytest.raises(capsa.VolumeError, match="mounting the volume"):
        await capsa.sandbox().volume(vol, "/data").build(120)
    # The volume can still be removed, and nothing is left.
    capsa.volume("corrupt", root=tmp_path)
    from capsa.volume import VolumeStore

    VolumeStore(tmp_path).remove("corrupt")
    assert not vol.path.exists()


# -- the server's content API --


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("volsec")
    keys = tmp / "keys.txt"
    keys.write_text(f"{KEY} tenant=t1\n")
    srv = start_server(
        tmp,
        *("--api-key-file", str(keys), "--memory", "256", "--max-sandboxes", "2"),
        *("--state-dir", str(tmp / "state"), "--volume-size-mb", "16"),
    )
    srv.log = tmp / "state"  # where the volumes are: the tests check nothing escaped it
    try:
        yield srv
    finally:
        srv.stop()


def _create(server: Server, name: str) -> dict[str, Any]:
    reply = httpx.post(f"{server.url}/volumes", json={"name": name}, headers={"X-API-KEY": KEY})
    assert reply.status_code == 201, reply.text
    return dict(reply.json())


def _content(server: Server, vol: dict[str, Any], method: str, what: str, **kw: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {vol['token']}"}
    url = f"{server.url}/volumecontent/{vol['volumeID']}/{what}"
    return httpx.request(method, url, headers=headers, timeout=180, **kw)


@pytest.mark.timeout(400)
def test_server_refuses_hostile_volume_names(server: Server) -> None:
    state = server.log
    for name in ["../../escape", "a/b", "..", ".x", "a\u0000b", "x" * 200, 7, None]:
        reply = httpx.post(f"{server.url}/volumes", json={"name": name}, headers={"X-API-KEY": KEY})
        assert reply.status_code == 400, (name, reply.text)
    escaped = [p for p in state.parent.rglob("*escape*")]
    assert escaped == []


def _sdk(server: Server) -> dict[str, Any]:
    return {"api_key": KEY, "api_url": server.url, "sandbox_url": server.url, "retries": 0}


def _assert_confined(server: Server, vol: dict[str, Any]) -> None:
    """No content call follows the symlinks planted in ``vol`` or a ``..`` out of it."""
    for path in ["/etc/passwd", "/passwd", "/root/etc/passwd", "/d/up/passwd", "/../etc/passwd",
                 "/d/../../etc/passwd"]:  # fmt: skip
        reply = _content(server, vol, "GET", "file", params={"path": path})
        assert reply.status_code in (400, 404), (path, reply.status_code)
        assert b"root:" not in reply.content
    for path in ["/etc", "/root", "/d/up"]:
        listing = _content(server, vol, "GET", "dir", params={"path": path})
        assert listing.status_code in (400, 404), (path, listing.text[:200])
    for path in ["/etc/evil", "/root/tmp/evil", "/d/up/evil", "/../evil"]:
        write = _content(
            server, vol, "PUT", "file", params={"path": path, "force": "true"}, content=b"x"
        )
        assert write.status_code in (400, 404), (path, write.text[:200])
        assert _content(server, vol, "DELETE", "path", params={"path": path}).status_code in (400, 404)
    # chmod through a symlink would change a file outside the volume: refused
    meta = _content(server, vol, "PATCH", "path", params={"path": "/passwd"}, json={"mode": 0o777})
    assert meta.status_code == 400, meta.text
    # the symlinks themselves are listed as symlinks, never followed
    entries = {e["path"]: e for e in _content(server, vol, "GET", "dir", params={"path": "/"}).json()}
    assert entries["/etc"]["type"] == "symlink" and entries["/etc"]["target"] == "/etc"


@pytest.mark.timeout(400)
def test_symlinks_and_dotdot_never_leave_the_volume(server: Server) -> None:
    """Through the sandbox that mounts the volume (while it runs), then through the helper."""
    vol = _create(server, "links")
    # A sandbox (hostile code) plants symlinks to the guest's root and to a file outside.
    e2b = pytest.importorskip("e2b")
    sandbox = e2b.Sandbox.create(volume_mounts={"/data": "links"}, **_sdk(server))
    try:
        sandbox.commands.run(
            "ln -s /etc /data/etc && ln -s / /data/root && ln -s /etc/passwd /data/passwd && "
            "mkdir /data/d && ln -s ../../etc /data/d/up && sync",
            user="root",
        )
        _assert_confined(server, vol)  # served by the sandbox itself: its /etc is right there
        assert sandbox.commands.run("stat -c %a /etc/passwd").stdout.strip() == "644"
    finally:
        sandbox.kill()
    _assert_confined(server, vol)


@pytest.mark.timeout(400)
def test_a_sandbox_that_moves_its_volume_away_is_never_served_as_the_volume(server: Server) -> None:
    """Content calls through a running sandbox check that its mount path is still the volume's
    root (its disk, inode 2): a sandbox that unmounted it, or put a directory or a symlink at its
    mount path, gets 409, and its own files are never read or written as the volume's."""
    vol = _create(server, "moved")
    e2b = pytest.importorskip("e2b")
    sandbox = e2b.Sandbox.create(volume_mounts={"/data": "moved"}, **_sdk(server))
    try:
        put = _content(server, vol, "PUT", "file", params={"path": "/x"}, content=b"through it")
        assert put.status_code == 201, put.text
        assert sandbox.commands.run("cat /data/x").stdout == "through it"
        sandbox.commands.run("umount /data && echo fake > /data/x && mkdir /data/d", user="root")
        for what in ("file", "path"):
            reply = _content(server, vol, "GET", what, params={"path": "/x"})
            assert reply.status_code == 409 and b"fake" not in reply.content, reply.text
        reply = _content(server, vol, "PUT", "file", params={"path": "/d/y"}, content=b"in")
        assert reply.status_code == 409, reply.text
        sandbox.commands.run("rm -rf /data && ln -s /etc /data", user="root")
        reply = _content(server, vol, "GET", "file", params={"path": "/passwd"})
        assert reply.status_code == 409 and b"root:" not in reply.content, reply.text
        assert sandbox.commands.run("ls /etc | grep -c '^y$' || true").stdout.strip() == "0"
    finally:
        sandbox.kill()
    assert _content(server, vol, "GET", "file", params={"path": "/x"}).content == b"through it"


@pytest.mark.timeout(400)
def test_oversize_writes_are_refused_and_leave_nothing(server: Server) -> None:
    vol = _create(server, "oversize")
    big = os.urandom(20 << 20)  # more than the 16 MiB volume
    reply = _content(server, vol, "PUT", "file", params={"path": "/big"}, content=big)
    assert reply.status_code in (413, 507), reply.text
    fits_not = os.urandom(15 << 20)  # under the size, over the free space (journal, metadata)
    reply = _content(server, vol, "PUT", "file", params={"path": "/almost"}, content=fits_not)
    assert reply.status_code == 507, reply.text
    listing = _content(server, vol, "GET", "dir", params={"path": "/"}).json()
    assert [e["name"] for e in listing] == ["lost+found"]  # no partial file left behind
    ok = _content(server, vol, "PUT", "file", params={"path": "/small"}, content=b"fine")
    assert ok.status_code == 201, ok.text
