"""Crash consistency of ``capsa serve --state-dir`` by fault injection: SIGKILL the server at a
random moment of a create, pause, resume, snapshot, kill or volume write, restart it on the same
state dir, and check after every restart that

- the database opens (the server starts) and no row says a sandbox runs (a crash ended them);
- every listed sandbox resumes and runs a command, every listed snapshot starts a sandbox;
- nothing half-done is listed or left: each row's files are complete, each file has a row;
- no QEMU of the killed server outlives it by 10 s, and its runtime directory is gone;
- the volume is listed, and its file holds one whole write (never part of one), and takes more.

Sized for CI: rounds until ``BUDGET`` seconds have passed (at least ``MIN_ROUNDS``). The seed is
printed; ``CAPSA_FAULT_SEED`` replays a run."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from tests.server.conftest import Server, free_port, start_server
from tests.server.test_server_durable import _alive, _all, _descendants

e2b = pytest.importorskip("e2b")
from e2b import Sandbox  # noqa: E402

pytestmark = [pytest.mark.vm, pytest.mark.timeout(400)]

BUDGET = 45.0  # seconds of rounds (each CI run draws new random moments: coverage adds up)
MIN_ROUNDS = 4
OPS = ("create", "pause", "resume", "snapshot", "kill", "volume_write")
VOLUME = "faults"
WRITTEN: list[bytes] = []  # every payload a volume write was asked to write (one file, whole or not)
MAX_KEPT = 2  # sandboxes (and snapshots) kept between rounds: the checks resume each one


def _start(tmp: Path, port: int) -> Server:
    server = start_server(tmp, "--max-sandboxes", "4", "--memory", "256", "--state-dir",
                          str(tmp / "state"), "--volume-size-mb", "16", port=port)  # fmt: skip
    os.environ.update(server.env())
    os.environ["E2B_VOLUME_API_URL"] = server.url
    return server


def _volume() -> e2b.Volume:
    listed = [v for v in e2b.Volume.list() if v.name == VOLUME]
    return e2b.Volume.connect(listed[0].volume_id) if listed else e2b.Volume.create(VOLUME)


def _volume_write(rng: random.Random) -> bytes:
    """A payload no other write used (its length tells them apart), remembered before it is sent."""
    payload = bytes([65 + len(WRITTEN) % 26]) * rng.randint(1, 2 << 20) + f"#{len(WRITTEN)}".encode()
    WRITTEN.append(payload)
    return payload


def _op(name: str, target: str | bytes | None, errors: list[BaseException]) -> None:
    """One operation, cut short by the crash (its error is expected, and kept for the log)."""
    try:
        if name == "create":
            Sandbox.create(timeout=300)
        elif name == "volume_write":
            assert isinstance(target, bytes)
            _volume().write_file("/f.bin", target)
        elif not isinstance(target, str):
            return
        elif name == "pause":
            Sandbox.connect(target, timeout=300).pause()
        elif name == "resume":
            Sandbox.connect(target, timeout=300).commands.run("true")
        elif name == "snapshot":
            Sandbox.connect(target, timeout=300).create_snapshot()
        else:
            Sandbox.kill(target)
    except BaseException as exc:  # the connection drops with the server
        errors.append(exc)


def _rows(state: Path) -> tuple[list[tuple[str, str, str | None]], list[tuple[str, str]]]:
    db = sqlite3.connect(f"file:{state / 'state.db'}?mode=ro", uri=True, timeout=5)
    try:
        sandboxes = db.execute("SELECT id, state, dir FROM sandboxes").fetchall()
        snapshots = db.execute("SELECT id, dir FROM snapshots").fetchall()
    finally:
        db.close()
    return sandboxes, snapshots


def _check(state: Path, old_pid: int) -> None:
    sandboxes, snapshots = _rows(state)
    assert all(s == "paused" for _, s, _ in sandboxes), sandboxes  # the crash ended the running ones
    dirs = {Path(d) for _, _, d in sandboxes if d} | {Path(d) for _, d in snapshots}
    for directory in dirs:
        assert (directory / "snapshot.json").is_file(), f"{directory} is listed but incomplete"
        assert not directory.name.endswith(".partial")
    on_disk = {p for sub in ("paused", "snapshots") for p in (state / sub).iterdir()}
    assert on_disk == dirs, f"files without a row: {on_disk - dirs}"
    bases = [Path(os.environ.get("XDG_RUNTIME_DIR") or "/nonexistent"), Path("/dev/shm"), Path("/tmp")]
    left = [p for base in bases if base.is_dir() for p in base.glob(f"capsa-{old_pid}-*")]
    assert not left, f"runtime dirs of the killed server: {left}"
    listed = {s.sandbox_id for s in _all(Sandbox.list())}
    assert listed == {i for i, _, _ in sandboxes}, (listed, sandboxes)
    for sandbox_id in sorted(listed)[MAX_KEPT:]:
        Sandbox.kill(sandbox_id)
    for sandbox_id in sorted(listed)[:MAX_KEPT]:  # usable: resumes and runs a command
        assert Sandbox.connect(sandbox_id, timeout=300).commands.run("echo ok").stdout == "ok\n"
    saved = [s.snapshot_id for s in _all(Sandbox.list_snapshots())]
    assert len(saved) == len(snapshots), (saved, snapshots)
    for snapshot_id in saved[:-1]:
        Sandbox.delete_snapshot(snapshot_id)
    if saved:  # the newest starts a sandbox
        child = Sandbox.create(saved[-1], timeout=120)
        assert child.commands.run("echo ok").stdout == "ok\n"
        child.kill()
    if WRITTEN:  # the volume: listed, its file one whole write, and it takes another
        volume = _volume()
        if volume.exists("/f.bin"):
            content = volume.read_file("/f.bin", format="bytes")
            assert content in WRITTEN, f"a partial write: {len(content)} bytes"
        names = [e.name for e in volume.list("/")]
        assert not [n for n in names if n.startswith(".capsa-upload-")], names  # swept at start
        marker = b"after the restart #%d" % len(WRITTEN)
        WRITTEN.append(marker)
        volume.write_file("/f.bin", marker)
        assert volume.read_file("/f.bin", format="bytes") == marker


def _target(op: str) -> str | None:
    """A sandbox for ``op``: a paused one to resume, a running one to pause, snapshot or kill."""
    found = {s.sandbox_id: getattr(s.state, "value", s.state) for s in _all(Sandbox.list())}
    want = "paused" if op == "resume" else "running"
    chosen = next((i for i, s in sorted(found.items()) if s == want), None)
    if chosen is None and op != "create":
        sandbox = Sandbox.create(timeout=300)
        sandbox.files.write("/home/user/f.txt", "x")
        if op == "resume":
            sandbox.pause()
        chosen = sandbox.sandbox_id
    return chosen


def test_sigkill_at_random_points_leaves_a_consistent_state(tmp_path: Path) -> None:
    seed = int(os.environ.get("CAPSA_FAULT_SEED") or time.time())
    print(f"fault injection seed {seed} (CAPSA_FAULT_SEED={seed} replays it)")
    rng = random.Random(seed)
    keys = ("E2B_API_URL", "E2B_SANDBOX_URL", "E2B_API_KEY", "E2B_VOLUME_API_URL")
    old = {k: os.environ.get(k) for k in keys}
    port = free_port()
    server = _start(tmp_path, port)
    started, rounds = time.monotonic(), 0
    history: list[str] = []
    try:
        while rounds < MIN_ROUNDS or time.monotonic() - started < BUDGET:
            op = rng.choice(OPS) if rounds else "volume_write"  # every run crashes one write
            target = _volume_write(rng) if op == "volume_write" else _target(op)
            delay = rng.uniform(0.0, 3.0)
            shown = f"{len(target)} bytes" if isinstance(target, bytes) else target
            history.append(f"{op} {shown} killed after {delay:.2f}s")
            errors: list[BaseException] = []
            worker = threading.Thread(target=_op, args=(op, target, errors), daemon=True)
            worker.start()
            time.sleep(delay)
            pid = server.process.pid
            children = _descendants(pid)
            server.process.send_signal(signal.SIGKILL)
            server.process.wait(10)
            deadline = time.monotonic() + 10
            while any(_alive(p) for p in children) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not [p for p in children if _alive(p)], f"QEMU outlived the server: {history}"
            worker.join(60)
            server = _start(tmp_path, port)
            _check(tmp_path / "state", pid)
            rounds += 1
        print(f"{rounds} rounds in {time.monotonic() - started:.0f}s: {history}")
    except BaseException:
        print(f"seed {seed}, rounds: {history}\n{server.log.read_text()[-3000:]}")
        raise
    finally:
        server.stop()
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
