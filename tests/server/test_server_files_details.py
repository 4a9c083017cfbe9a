"""What E2B's own SDK test suite expects of files and commands, checked through the real SDK against
``capsa serve`` with real guests: file metadata, gzip transfers, entry details, signed URLs, watch
entries, the default working directory, long arguments, a sandbox killed mid-command, and the
account ``user`` commands and writes act as."""

from __future__ import annotations

import datetime
import gzip
import json
import os
import secrets
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

e2b = pytest.importorskip("e2b")

from e2b import (  # noqa: E402
    AuthenticationException,
    FilesystemEventType,
    FileType,
    InvalidArgumentException,
    PtySize,
    Sandbox,
    SandboxException,
    SandboxQuery,
    TimeoutException,
)
from e2b.sandbox.filesystem.filesystem import WriteEntry  # noqa: E402

from capsa.recipes import store  # noqa: E402
from tests.server.conftest import Server, start_server  # noqa: E402
from tests.unit.test_oci import BUSYBOX, base_layer, docker_archive, top_layer  # noqa: E402

pytestmark = [pytest.mark.vm, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server of its own with one pooled base sandbox (no code interpreter needed here)."""
    srv = start_server(tmp_path_factory.mktemp("serve"), "--pool", "base=1")
    old = {k: os.environ.get(k) for k in srv.env()}
    os.environ.update(srv.env())
    try:
        yield srv
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        srv.stop()


@pytest.fixture(scope="module")
def sbx(server: Server) -> Iterator[Sandbox]:
    sandbox = Sandbox.create(timeout=600)
    yield sandbox
    sandbox.kill()


def _raw(server: Server, sbx: Sandbox) -> httpx.Client:
    """A plain HTTP client speaking to the sandbox's envd as the SDK does."""
    headers = {
        "E2b-Sandbox-Id": sbx.sandbox_id,
        "E2b-Sandbox-Port": "49983",
        "X-Access-Token": sbx._envd_access_token or "",
    }
    return httpx.Client(base_url=server.url, headers=headers, timeout=60)


def test_metadata_is_kept_listed_renamed_and_cleared(sbx: Sandbox) -> None:
    info = sbx.files.write("meta/a.txt", "one", metadata={"Author": "ann", "stage": "draft"})
    assert info.metadata == {"author": "ann", "stage": "draft"}  # keys lowercased, as envd does
    assert sbx.files.get_info("meta/a.txt").metadata == {"author": "ann", "stage": "draft"}
    listed = {entry.name: entry.metadata for entry in sbx.files.list("meta")}
    assert listed == {"a.txt": {"author": "ann", "stage": "draft"}}

    moved = sbx.files.rename("meta/a.txt", "meta/b.txt")
    assert moved.metadata == {"author": "ann", "stage": "draft"}

    again = sbx.files.write("meta/b.txt", "two")  # a new upload without metadata clears it
    assert again.metadata is None
    assert sbx.files.get_info("meta/b.txt").metadata is None

    both = sbx.files.write_files(
        [WriteEntry(path="meta/c.txt", data="c"), WriteEntry(path="meta/d.txt", data="d")],
        metadata={"batch": "1"},
    )
    assert [w.metadata for w in both] == [{"batch": "1"}, {"batch": "1"}]
    assert sbx.files.get_info("meta/d.txt").metadata == {"batch": "1"}
    # stored on the file in the guest, under E2B's namespace (trusted.* where tmpfs has no user.*:
    # only root sees those)
    found = sbx.commands.run(
        "python3 -c \"import os; print(sorted(n for n in os.listxattr('meta/d.txt') if 'e2b' in n))\"",
        user="root",
        cwd="/home/user",
    )
    assert "e2b.batch" in found.stdout


def test_bad_metadata_is_refused(server: Server, sbx: Sandbox) -> None:
    with pytest.raises(InvalidArgumentException):  # the SDK checks first
        sbx.files.write("meta/bad.txt", "x", metadata={"bad key": "v"})
    with _raw(server, sbx) as client:  # and so does the server
        reply = client.post(
            "/files",
            params={"path": "meta/bad.txt"},
            content=b"x",
            headers={"Content-Type": "application/octet-stream", "X-Metadata-ok": b"caf\xe9"},
        )
    assert reply.status_code == 400
    assert not sbx.files.exists("meta/bad.txt")


def test_gzip_upload_and_download(server: Server, sbx: Sandbox) -> None:
    content = "compressible line\n" * 5000
    sbx.files.write("gz/a.txt", content, gzip=True)
    assert sbx.files.read("gz/a.txt") == content
    assert sbx.files.read("gz/a.txt", gzip=True) == content
    with _raw(server, sbx) as client:
        reply = client.get("/files", params={"path": "gz/a.txt"}, headers={"Accept-Encoding": "gzip"})
        assert reply.headers.get("content-encoding") == "gzip"
        assert int(reply.headers.get("content-length") or len(reply.content)) > 0
        assert reply.text == content  # httpx inflated it
        plain = client.get(
            "/files", params={"path": "gz/a.txt"}, headers={"Accept-Encoding": "identity"}
        )
        assert "content-encoding" not in plain.headers and plain.text == content
        # two gzip members in one body are one file, as gzip defines
        body = gzip.compress(b"first ") + gzip.compress(b"second")
        headers = {"Content-Type": "application/octet-stream", "Content-Encoding": "gzip"}
        assert client.post(
            "/files", params={"path": "gz/b.txt"}, content=body, headers=headers
        ).is_success
        broken = client.post("/files", params={"path": "gz/c.txt"}, content=body[:-6], headers=headers)
        assert broken.status_code == 400
        other = {"Content-Type": "application/octet-stream", "Content-Encoding": "br"}
        assert (
            client.post("/files", params={"path": "gz/d.txt"}, content=b"x", headers=other).status_code
            == 415
        )
    assert sbx.files.read("gz/b.txt") == "first second"


def test_entry_details_come_from_the_guest(sbx: Sandbox) -> None:
    sbx.files.write("details/file.txt", "12345")
    sbx.commands.run("mkdir -p details/sub/deep && sudo chown 65534:65534 details/file.txt")
    sbx.commands.run("ln -s file.txt link", cwd="details")
    info = sbx.files.get_info("details/file.txt")
    assert (info.owner, info.group) == ("nobody", "nogroup")  # names from the guest's tables
    assert (info.mode, info.permissions, info.size) == (0o644, "-rw-r--r--", 5)
    assert info.modified_time is not None and info.modified_time.tzinfo is not None
    folder = sbx.files.get_info("details/sub")
    assert (folder.type, folder.owner, folder.permissions) == (FileType.DIR, "user", "drwxr-xr-x")
    link = sbx.files.get_info("details/link")
    assert link.symlink_target == "/home/user/details/file.txt"  # absolute, as envd gives it
    assert link.size == 5  # the target's, the entry itself being marked a symlink
    names = [
        entry.path.removeprefix("/home/user/details/") for entry in sbx.files.list("details", depth=3)
    ]
    assert names == ["file.txt", "link", "sub", "sub/deep"]  # lexical pre-order


def test_empty_and_missing_files(sbx: Sandbox) -> None:
    sbx.commands.run("touch empty.txt")  # commands start in /home/user, as relative file paths
    assert sbx.commands.run("pwd").stdout.strip() == "/home/user"
    assert sbx.files.read("empty.txt") == ""
    sbx.files.remove("no-such-file.txt")  # as envd: nothing to remove is no error


def test_long_argument_and_broken_utf8_output(sbx: Sandbox) -> None:
    result = sbx.commands.run('printf "%s\\xe2" ' + "b" * 10_000)  # one argument over 4 KiB
    assert result.stdout == "b" * 10_000 + "\ufffd"
    scoped = sbx.commands.run("echo $ONLY_HERE", envs={"ONLY_HERE": "yes"})
    assert scoped.stdout.strip() == "yes"
    assert sbx.commands.run('echo "[$ONLY_HERE]"').stdout.strip() == "[]"


def test_signed_urls(server: Server) -> None:
    sandbox = Sandbox.create(timeout=120, secure=True)
    try:
        sandbox.files.write("signed.txt", "signed content")
        with urllib.request.urlopen(sandbox.download_url("signed.txt"), timeout=30) as reply:
            assert reply.read() == b"signed content"
        with urllib.request.urlopen(sandbox.download_url("signed.txt", None, 60), timeout=30) as reply:
            assert reply.read() == b"signed content"
        upload = urllib.request.Request(
            sandbox.upload_url("up.txt"),
            data=b"uploaded",
            headers={"Content-Type": "application/octet-stream"},
            method="POST",
        )
        with urllib.request.urlopen(upload, timeout=30) as reply:
            assert reply.status == 200
        assert sandbox.files.read("up.txt") == "uploaded"

        expired = sandbox.download_url("signed.txt", None, use_signature_expiration=-60)
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(expired, timeout=30)
        assert caught.value.code == 401
        assert json.loads(caught.value.read()) == {
            "code": 401,
            "message": "signature is already expired",
        }

        # a read signature is no write signature, and a changed path no signature at all
        as_upload = urllib.request.Request(sandbox.download_url("up.txt"), data=b"x", method="POST")
        for request in (as_upload, sandbox.download_url("signed.txt").replace("signed.txt", "up.txt")):
            with pytest.raises(urllib.error.HTTPError) as caught:
                urllib.request.urlopen(request, timeout=30)
            assert caught.value.code == 401
        # without a signature, /files without routing headers stays the control plane's (a key)
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(f"{server.url}/files?path=signed.txt", timeout=30)
        assert caught.value.code == 401
    finally:
        sandbox.kill()


def test_watch_events_carry_entries(sbx: Sandbox) -> None:
    sbx.files.make_dir("watched")
    handle = sbx.files.watch_dir("watched", include_entry=True, allow_network_mounts=True)
    try:
        sbx.files.write("watched/new.txt", "hello")
        events = handle.get_new_events()
        sbx.commands.run("touch watched/empty.txt")
        events += handle.get_new_events()
        assert [(e.name, e.type) for e in events] == [
            ("new.txt", FilesystemEventType.CREATE),
            ("new.txt", FilesystemEventType.WRITE),  # content: it was written after its creation
            ("empty.txt", FilesystemEventType.CREATE),  # no content: only created
        ]
        entry = events[0].entry
        assert entry is not None and entry.path == "/home/user/watched/new.txt"
        assert entry.type == FileType.FILE and entry.size == 5
    finally:
        handle.stop()


def test_killed_sandbox_ends_running_commands(server: Server) -> None:
    sandbox = Sandbox.create(timeout=120)
    command = sandbox.commands.run("sleep 60", background=True)
    sandbox.kill()
    started = time.monotonic()
    with pytest.raises((TimeoutException, SandboxException)) as caught:
        command.wait()
    assert "killed" in str(caught.value)
    assert time.monotonic() - started < 20  # promptly, not at the command's end


def test_connect_never_shortens_and_started_after_includes_the_start(sbx: Sandbox) -> None:
    before = Sandbox.get_info(sbx.sandbox_id)
    Sandbox.connect(sbx.sandbox_id, timeout=10)  # shorter than what is left: no change
    assert Sandbox.get_info(sbx.sandbox_id).end_at == before.end_at
    Sandbox.connect(sbx.sandbox_id, timeout=3600)  # longer: extended
    assert Sandbox.get_info(sbx.sandbox_id).end_at > before.end_at
    listed = Sandbox.list(query=SandboxQuery(started_after=before.started_at)).next_items()
    assert sbx.sandbox_id in [s.sandbox_id for s in listed]
    later = before.started_at + datetime.timedelta(seconds=1)
    assert sbx.sandbox_id not in [
        s.sandbox_id for s in Sandbox.list(query=SandboxQuery(started_after=later)).next_items()
    ]


def test_commands_and_files_act_as_the_account_user(sbx: Sandbox) -> None:
    """As in E2B: commands, terminals and writes are the account ``user``'s (uid 1000, home
    /home/user, root through passwordless sudo) unless the SDK asks for ``user="root"``."""
    who = sbx.commands.run('echo "$(whoami) $(id -u):$(id -g) $HOME $USER $(pwd)"')
    assert who.stdout == "user 1000:1000 /home/user user /home/user\n"
    assert sbx.commands.run("sudo whoami").stdout == "root\n"
    assert sbx.commands.run("python --version").stdout.startswith("Python 3")
    as_root = sbx.commands.run('echo "$(whoami) $HOME $(pwd)"', user="root")
    assert as_root.stdout == "root /root /root\n"

    written = sbx.files.write("owned/by-user.txt", "mine")  # relative: in /home/user
    assert written.path == "/home/user/owned/by-user.txt"
    info = sbx.files.get_info("owned/by-user.txt")
    assert (info.owner, info.group) == ("user", "user")
    assert sbx.files.get_info("owned").owner == "user"  # the parent the write created too
    assert sbx.commands.run("stat -c %U:%G /home/user/owned/by-user.txt").stdout == "user:user\n"
    sbx.files.write("/tmp/by-root.txt", "root's", user="root")
    assert sbx.files.get_info("/tmp/by-root.txt").owner == "root"
    sbx.files.write("/root/for-root.txt", "x")  # a write is envd's (root's), handed to user
    assert sbx.files.get_info("/root/for-root.txt").owner == "user"
    assert sbx.files.make_dir("made/here")
    assert [e.owner for e in sbx.files.list("made")] == ["user"]
    sbx.files.make_dir("/tmp/rootdir", user="root")
    assert sbx.files.get_info("/tmp/rootdir").owner == "root"
    moved = sbx.files.rename("/tmp/by-root.txt", "new/place/by-root.txt")
    assert (moved.path, moved.owner) == ("/home/user/new/place/by-root.txt", "root")
    assert sbx.files.get_info("new/place").owner == "user"  # the destination's new parents

    terminal = sbx.pty.create(PtySize(rows=24, cols=80))
    seen: list[bytes] = []
    sbx.pty.send_stdin(terminal.pid, b"echo who-$(whoami); exit\n")
    terminal.wait(on_pty=seen.append)
    assert b"who-user" in b"".join(seen)

    with pytest.raises(AuthenticationException, match="invalid username: 'nobody-here'"):
        sbx.commands.run("true", user="nobody-here")
    with pytest.raises(AuthenticationException):
        sbx.files.write("/tmp/never.txt", "x", user="nobody-here")
    assert not sbx.files.exists("/tmp/never.txt")


@pytest.mark.skipif(not BUSYBOX.exists(), reason="needs a static /bin/busybox")
def test_an_image_without_the_account_user_keeps_working(server: Server, tmp_path: Path) -> None:
    """A named image without the account ``user`` (an imported busybox archive): what names no
    account falls back to the agent's default (root for file writes); naming ``user`` is refused."""
    name = f"capsa-test-nouser-{secrets.token_hex(3)}"
    store.import_oci(name, docker_archive(tmp_path / "busybox.tar", [base_layer(), top_layer()]))
    try:
        sandbox = Sandbox.create(template=name, timeout=120)
        try:
            written = sandbox.files.write("notes/fallback.txt", "x")
            assert written.path == "/home/user/notes/fallback.txt"
            assert sandbox.files.get_info("notes/fallback.txt").owner == "root"
            assert sandbox.files.make_dir("/tmp/made")
            with pytest.raises(AuthenticationException, match="invalid username: 'user'"):
                sandbox.files.write("/tmp/named.txt", "x", user="user")
        finally:
            sandbox.kill()
    finally:
        store.remove(name)
