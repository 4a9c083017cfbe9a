"""E2B's Volume API through the real Python SDK (issue 25 item 5): create/list/get/destroy per
tenant, the content API (write, read, list, make dir, stat, metadata, remove) and ``volume_mounts``
at create; a volume outlives its sandbox, and is held while a sandbox mounts it (content calls then
go through that sandbox while it runs)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.server.conftest import Server, start_server

e2b = pytest.importorskip("e2b")

pytestmark = [pytest.mark.vm, pytest.mark.timeout(400)]

KEY_A = f"alpha-{secrets.token_hex(16)}"
KEY_B = f"beta-{secrets.token_hex(16)}"


def _api(server: Server, key: str = KEY_A) -> dict[str, Any]:
    return {"api_key": key, "api_url": server.url}


def _sdk(server: Server, key: str = KEY_A) -> dict[str, Any]:
    return {**_api(server, key), "sandbox_url": server.url, "retries": 0}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("volumes")
    keys = tmp / "keys.txt"
    keys.write_text(f"{KEY_A} tenant=alpha\n{KEY_B} tenant=beta\n")
    srv = start_server(
        tmp,
        *("--api-key-file", str(keys), "--memory", "256", "--max-sandboxes", "3"),
        *("--state-dir", str(tmp / "state"), "--volume-size-mb", "32"),
    )
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def content_url(server: Server, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("E2B_VOLUME_API_URL", server.url)  # where the SDK sends content calls
    return server.url


def test_volume_lifecycle_and_content(server: Server, content_url: str) -> None:
    vol = e2b.Volume.create("project", **_api(server))
    assert vol.name == "project" and vol.volume_id and vol.token
    assert [v.name for v in e2b.Volume.list(**_api(server))] == ["project"]
    assert e2b.Volume.get_info(vol.volume_id, **_api(server)).token == vol.token
    with pytest.raises(Exception, match=r"409|already exists"):
        e2b.Volume.create("project", **_api(server))

    entry = vol.write_file("/src/main.py", "print('hi')\n", force=True, mode=0o640)
    assert entry.path == "/src/main.py" and entry.size == 12 and entry.mode == 0o640
    assert vol.read_file("/src/main.py") == "print('hi')\n"
    assert vol.read_file("/src/main.py", format="bytes") == b"print('hi')\n"
    made = vol.make_dir("/out/logs", force=True, uid=1000, gid=1000)
    assert made.type.value == "directory" and made.uid == 1000
    names = {e.path for e in vol.list("/", depth=3)}
    assert {"/src", "/src/main.py", "/out", "/out/logs"} <= names
    assert vol.get_info("/src/main.py").size == 12
    assert vol.update_metadata("/src/main.py", mode=0o600).mode == 0o600
    assert vol.exists("/src/main.py") and not vol.exists("/nope")
    with pytest.raises(e2b.VolumePathNotFoundException):
        vol.read_file("/nope")
    vol.remove("/out")
    assert not vol.exists("/out/logs")

    # The other tenant sees nothing of it, and may have a volume of the same name.
    assert e2b.Volume.list(**_api(server, KEY_B)) == []
    with pytest.raises(e2b.VolumeNotFoundException):
        e2b.Volume.get_info(vol.volume_id, **_api(server, KEY_B))
    other = e2b.Volume.create("project", **_api(server, KEY_B))
    assert other.volume_id != vol.volume_id
    assert not other.exists("/src/main.py")
    # A token opens its own volume only.
    stranger = e2b.Volume(vol.volume_id, vol.name, token=other.token)
    with pytest.raises(Exception, match=r"401|invalid"):
        stranger.read_file("/src/main.py")
    assert e2b.Volume.destroy(other.volume_id, **_api(server, KEY_B))


def test_volume_mounts_at_create(server: Server, content_url: str) -> None:
    vol = e2b.Volume.create("mounted", **_api(server))
    vol.write_file("/seed.txt", "from the API\n")
    sandbox = e2b.Sandbox.create(volume_mounts={"/data": vol}, **_sdk(server))
    try:
        assert sandbox.files.read("/data/seed.txt") == "from the API\n"
        done = sandbox.commands.run("echo from the sandbox > /data/made.txt && sync && df -m /data")
        assert "/data" in done.stdout
        detail = httpx.get(
            f"{server.url}/sandboxes/{sandbox.sandbox_id}", headers={"X-API-KEY": KEY_A}
        ).json()
        assert detail["volumeMounts"] == [{"name": "mounted", "path": "/data"}]
        # While it runs, content calls go through it (its kernel is the one writer): each side
        # sees the other's changes at once.
        assert vol.read_file("/seed.txt") == "from the API\n"
        assert vol.read_file("/made.txt") == "from the sandbox\n"
        assert vol.write_file("/api/new.txt", b"\x00binary\xff", force=True, mode=0o600).mode == 0o600
        assert sandbox.files.read("/data/api/new.txt", format="bytes") == b"\x00binary\xff"
        assert vol.read_file("/api/new.txt", format="bytes") == b"\x00binary\xff"
        assert vol.make_dir("/api/sub", uid=1000).uid == 1000
        assert {e.path for e in vol.list("/api")} == {"/api/new.txt", "/api/sub"}
        assert vol.update_metadata("/api/new.txt", mode=0o644).mode == 0o644
        vol.remove("/api")
        assert sandbox.commands.run("ls /data").stdout.split() == ["lost+found", "made.txt", "seed.txt"]
        with pytest.raises(e2b.VolumePathNotFoundException):
            vol.read_file("/nope")
        # Held while mounted: no destroy, no second mounter.
        with pytest.raises(Exception, match=r"409|mounted"):
            e2b.Volume.destroy(vol.volume_id, **_api(server))
        with pytest.raises(Exception, match=r"409|mounted"):
            e2b.Sandbox.create(volume_mounts={"/data": "mounted"}, **_sdk(server))
    finally:
        sandbox.kill()
    # The volume outlived the sandbox, with what the sandbox wrote.
    assert vol.read_file("/made.txt") == "from the sandbox\n"
    again = e2b.Sandbox.create(volume_mounts={"/v": "mounted"}, **_sdk(server))
    try:
        assert again.files.read("/v/made.txt") == "from the sandbox\n"
    finally:
        again.kill()
    assert e2b.Volume.destroy(vol.volume_id, **_api(server))
    assert not e2b.Volume.destroy(vol.volume_id, **_api(server))  # 404: already gone


def test_bad_volume_mounts_are_refused(server: Server) -> None:
    e2b.Volume.create("badmounts", **_api(server))
    for mounts in ({"relative": "badmounts"}, {"/x/../etc": "badmounts"}, {"/data": "missing"}):
        with pytest.raises(Exception, match=r"400|404|not found|absolute|'\.\.'"):
            e2b.Sandbox.create(volume_mounts=mounts, **_sdk(server))
    # another tenant's volume is not found by name
    with pytest.raises(Exception, match=r"404|not found"):
        e2b.Sandbox.create(volume_mounts={"/data": "badmounts"}, **_sdk(server, KEY_B))


def test_pause_keeps_the_volume_and_fork_is_refused(server: Server, content_url: str) -> None:
    vol = e2b.Volume.create("paused", **_api(server))
    sandbox = e2b.Sandbox.create(volume_mounts={"/data": "paused"}, timeout=300, **_sdk(server))
    try:
        sandbox.commands.run("echo one > /data/log && sync")
        results = sandbox.fork(count=1, timeout=60)  # two writers of one ext4 would corrupt it
        assert len(results) == 1 and isinstance(results[0], Exception), results
        assert sandbox.commands.run("cat /data/log").stdout == "one\n"
        sandbox.pause()
        with pytest.raises(Exception, match=r"409|mounted"):  # held while paused, too
            e2b.Volume.destroy(vol.volume_id, **_api(server))
        with pytest.raises(Exception, match=r"409|paused"):  # its frozen guest has it mounted
            vol.read_file("/log")
        resumed = e2b.Sandbox.connect(sandbox.sandbox_id, **_sdk(server))
        resumed.commands.run("echo two >> /data/log && sync")
        assert resumed.commands.run("cat /data/log").stdout == "one\ntwo\n"
    finally:
        sandbox.kill()
    connected = e2b.Volume.connect(vol.volume_id, **_api(server))
    assert connected.read_file("/log") == "one\ntwo\n"
    assert e2b.Volume.destroy(vol.volume_id, **_api(server))


def test_volumes_survive_a_restart(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Volumes, their ids and tokens are kept in --state-dir: a new server on it serves them. A
    sandbox paused while mounting a volume (by its client, or by the SIGTERM) keeps holding it
    across the restart, and resumes with it mounted."""
    tmp = tmp_path_factory.mktemp("restart")
    keys = tmp / "keys.txt"
    keys.write_text(f"{KEY_A} tenant=alpha\n")
    args = ("--api-key-file", str(keys), "--state-dir", str(tmp / "state"), "--volume-size-mb", "16",
            "--memory", "256")  # fmt: skip
    first = start_server(tmp, *args)
    sdk = {"api_key": KEY_A, "api_url": first.url, "sandbox_url": first.url, "retries": 0}
    try:
        vol = e2b.Volume.create("kept", api_key=KEY_A, api_url=first.url)
        vol.write_file("/a.txt", "before the restart", api_url=first.url)
        e2b.Volume.create("by-client", api_key=KEY_A, api_url=first.url)
        held = e2b.Volume.create("by-sigterm", api_key=KEY_A, api_url=first.url)
        paused = e2b.Sandbox.create(volume_mounts={"/data": "by-client"}, timeout=600, **sdk)
        paused.commands.run("echo paused by its client > /data/p.txt")  # in the page cache only
        paused.pause()
        running = e2b.Sandbox.create(volume_mounts={"/v": "by-sigterm"}, timeout=600, **sdk)
        running.commands.run("echo running at SIGTERM > /v/r.txt")
        running.commands.run("echo cut short > /v/.capsa-upload-0123456789abcdef")  # as by a crash
    finally:
        first.stop()  # SIGTERM: `running` is paused with its volume
    second = start_server(tmp, *args)
    sdk = {**sdk, "api_url": second.url, "sandbox_url": second.url}
    try:
        listed = e2b.Volume.list(api_key=KEY_A, api_url=second.url)
        assert {v.name for v in listed} == {"kept", "by-client", "by-sigterm"}
        assert vol.volume_id in {v.volume_id for v in listed}
        again = e2b.Volume.connect(vol.volume_id, api_key=KEY_A, api_url=second.url)
        assert again.token == vol.token
        assert again.read_file("/a.txt", api_url=second.url) == "before the restart"

        # Both paused sandboxes still hold their volumes: no destroy, no content call, no mount.
        for name in ("by-client", "by-sigterm"):
            with pytest.raises(Exception, match=r"409|mounted"):
                e2b.Sandbox.create(volume_mounts={"/x": name}, **sdk)
        with pytest.raises(Exception, match=r"409|mounted"):
            e2b.Volume.destroy(held.volume_id, api_key=KEY_A, api_url=second.url)
        with pytest.raises(Exception, match=r"409|mounted"):
            held.read_file("/r.txt", api_url=second.url)
        detail = httpx.get(
            f"{second.url}/sandboxes/{paused.sandbox_id}", headers={"X-API-KEY": KEY_A}
        ).json()
        assert detail["volumeMounts"] == [{"name": "by-client", "path": "/data"}]

        # ... and resume with them mounted, with what they wrote before the restart.
        resumed = e2b.Sandbox.connect(paused.sandbox_id, timeout=120, **sdk)
        assert resumed.commands.run("cat /data/p.txt").stdout == "paused by its client\n"
        by_sigterm = e2b.Sandbox.connect(running.sandbox_id, timeout=120, **sdk)
        by_sigterm.commands.run("echo after >> /v/r.txt && sync")
        assert by_sigterm.commands.run("cat /v/r.txt").stdout == "running at SIGTERM\nafter\n"
        resumed.kill()
        by_sigterm.kill()
        # Killed: the holds lapse, and the volumes keep what the sandboxes wrote.
        assert held.read_file("/r.txt", api_url=second.url) == "running at SIGTERM\nafter\n"
        # the first helper of this run removed the upload file a crash would have left
        assert [e.name for e in held.list("/", api_url=second.url)] == ["lost+found", "r.txt"]
        assert e2b.Volume.destroy(held.volume_id, api_key=KEY_A, api_url=second.url)
    finally:
        second.stop()
