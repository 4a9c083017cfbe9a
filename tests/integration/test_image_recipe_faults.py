"""Image recipes under stress: a step that writes more than the build VM's memory, and a build
killed with SIGKILL in the middle of a ``run()`` step (real processes, real guests).

Every image holds a token unique to this session, so its layers are built for real; the fixture
removes the layers, images and templates it made.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import capsa
from capsa.recipes.recipe import layers_root, plan
from tests.integration.test_image_recipes import Made
from tests.unit.test_recipe import rebuilt

pytestmark = pytest.mark.vm

STEP_SLEEP = 16  # seconds: the kill lands in the middle
BIG_MIB = 600  # more than the build VM's memory (1024 MiB) leaves to a tmpfs (half of it)
RANDOM_MIB = 64


@pytest.fixture(scope="module")
def made() -> Iterator[Made]:
    registry = Made()
    yield registry
    registry.cleanup()


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("faults") / "token"
    root.mkdir()
    (root / "token").write_text(uuid.uuid4().hex)
    return root


@pytest.mark.asyncio
@pytest.mark.timeout(600)
async def test_a_step_writing_more_than_the_build_vms_memory(
    made: Made, token: Path, sandbox_factory: object
) -> None:
    """Resource exhaustion: a run() step (as apt_install of a big package set) writes a 600 MiB
    file, more than the build VM's RAM-backed writable layer can hold; the build must not fail
    with "No space left on device", and the image must carry the whole file."""
    image = (
        capsa.Image.debian(name="big-step", context=token)
        .copy(token, "/opt/token")
        .run(  # incompressible at the start (checked below), zeros after it (faster under TCG)
            f"head -c {RANDOM_MIB}M /dev/urandom > /opt/big && sha256sum < /opt/big > /opt/big.sum "
            f"&& head -c {BIG_MIB - RANDOM_MIB}M /dev/zero >> /opt/big"
        )
    )
    made.images.append(image)
    started = time.monotonic()
    image.build()
    print(f"600 MiB step built in {time.monotonic() - started:.1f}s", file=sys.stderr)
    vm = await sandbox_factory(capsa.sandbox().image(image).memory_mb(256))  # type: ignore[operator]
    result = (
        await vm.agent.exec("/bin/sh")
        .args(
            ["-c", f"stat -c %s /opt/big && head -c {RANDOM_MIB}M /opt/big | sha256sum -c /opt/big.sum"]
        )
        .timeout(300)
        .run()
    )
    assert result.exit_code == 0, result
    assert result.stdout.splitlines()[0] == str(BIG_MIB << 20)


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (through /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            parents[int(entry.name)] = int(fields[1])
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for child, ppid in parents.items():
            if ppid == parent:
                found.append(child)
                todo.append(child)
    return found


def _is_qemu(pid: int) -> bool:
    try:
        return "qemu" in Path(f"/proc/{pid}/comm").read_text()
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def _build_and_kill(token: Path, command: str, marker: Path) -> tuple[int, list[int]]:
    """Build the recipe in a child Python process, SIGKILL it mid-step; its pid and its QEMUs'."""
    script = (
        "import pathlib, capsa\n"
        f"img = capsa.Image.debian(name='killed', context={str(token)!r}).copy({str(token)!r}, '/opt/token').run({command!r})\n"
        f"marker = pathlib.Path({str(marker)!r})\n"
        "def progress(line):\n"
        "    if line.startswith('step 2/2') and line.endswith(': building'):\n"
        "        marker.write_text('x')\n"
        "img.build(progress=progress)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src"))
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        qemus: list[int] = []
        while time.monotonic() < deadline and proc.poll() is None:
            qemus = [pid for pid in _children(proc.pid) if _is_qemu(pid)]
            if marker.exists() and qemus:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the build ended before it could be killed"
        assert qemus, "no QEMU child of the build process was found"
        time.sleep(STEP_SLEEP / 2)  # the build VM boots and the step runs its sleep
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(map(_alive, qemus)):
        time.sleep(0.2)
    return proc.pid, qemus


@pytest.mark.asyncio
@pytest.mark.timeout(600)
async def test_a_build_killed_mid_step_is_redone(
    made: Made, token: Path, tmp_path: Path, sandbox_factory: object
) -> None:
    """Interrupted build: the process building a recipe is SIGKILLed while its run() step sleeps
    in the build VM. No QEMU of that build may survive, no temporary file may stay in the layer
    cache, and the next build must redo the step (not find a partial layer) and work."""
    command = f"sleep {STEP_SLEEP}; echo redone > /opt/redone"
    image = capsa.Image.debian(name="killed", context=token).copy(token, "/opt/token").run(command)
    made.images.append(image)
    pid, qemus = _build_and_kill(token, command, tmp_path / "started")
    assert not [pid for pid in qemus if _alive(pid)], "a QEMU of the killed build survived"
    step = layers_root() / plan(image)[-1].key
    left = sorted(p.name for p in step.iterdir()) if step.is_dir() else []
    assert "layer.json" not in left, "the step finished before the kill: the test proves nothing"
    assert not [name for name in left if name != ".lock"], left  # nothing partial, nothing temp
    scratch = layers_root().parent / "build-scratch"
    assert not (list(scratch.glob(f"{pid}-*")) if scratch.is_dir() else [])

    # The next build redoes the same step (it was never recorded) and the image works.
    lines: list[str] = []
    image.build(progress=lines.append)
    assert rebuilt(lines) == ["step 2/2"], lines
    vm = await sandbox_factory(capsa.sandbox().image(image).memory_mb(256))  # type: ignore[operator]
    result = await vm.agent.exec("cat").args(["/opt/redone", "/opt/token/token"]).run()
    assert result.exit_code == 0 and result.stdout.startswith("redone\n"), result
