"""Sandboxes on a user image (``capsa.Image.from_oci``) on real guests.

The image is a busybox-only Docker archive the test writes itself (no Python in it): the agent keeps
capsa's root and runs commands and file operations inside the image's root.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import capsa
from tests.unit.test_oci import BUSYBOX, base_layer, docker_archive, top_layer

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(not BUSYBOX.exists(), reason="needs a static /bin/busybox"),
]


@pytest.fixture(scope="module")
def busybox_image(tmp_path_factory: pytest.TempPathFactory) -> capsa.Image:
    path = tmp_path_factory.mktemp("oci") / "busybox.tar"
    return capsa.Image.from_oci(docker_archive(path, [base_layer(), top_layer()]), name="bbtest")


@pytest.mark.asyncio
@pytest.mark.timeout(300)
async def test_busybox_image_runs_commands_in_its_root(
    sandbox_factory: object, busybox_image: capsa.Image
) -> None:
    builder = capsa.sandbox().image(busybox_image).memory_mb(256)
    vm = await sandbox_factory(builder)  # type: ignore[operator]
    release = await vm.agent.exec("cat").arg("/etc/os-release").run()
    assert release.exit_code == 0, release
    assert "capsa test image v2" in release.stdout  # the top layer's file
    # The image's own busybox and shell; no Python anywhere in this root.
    listing = await vm.agent.exec("/bin/sh").args(["-c", "ls /; ls /usr/bin/python3"]).run()
    assert "srv" in listing.stdout and listing.exit_code != 0
    # The image config's Env and WorkingDir are the exec defaults.
    env = await vm.agent.exec("/bin/sh").args(["-c", 'echo "$GREETING:$(pwd)"']).run()
    assert env.stdout == "a=b:/srv\n", env
    # Whiteouts and opaque directories, seen by commands and by file operations alike.
    assert not await vm.agent.exists("/etc/gone")
    assert not await vm.agent.exists("/opt/old")
    assert await vm.agent.read_file("/opt/new") == b"new\n"
    await vm.agent.write_file("/tmp/from-host", b"hello")
    cat = await vm.agent.exec("cat").arg("/tmp/from-host").run()
    assert cat.stdout == "hello"
    su = await vm.agent.stat("/usr/sbin/su")
    assert su.mode & 0o7777 == 0o4755
    info = await vm.agent.info()
    assert info.image == "bbtest"


@pytest.mark.asyncio
@pytest.mark.timeout(300)
async def test_image_user_is_the_exec_default(
    sandbox_factory: object, busybox_image: capsa.Image
) -> None:
    """The image config says ``User: 1000:1000``; ``.user()`` overrides it (names from the image's
    /etc/passwd and /etc/group, which has no NSS libraries to look them up)."""
    vm = await sandbox_factory(capsa.sandbox().image(busybox_image).memory_mb(256))  # type: ignore[operator]
    ids = "echo $(id -u):$(id -g):$(id -G):$HOME"
    default = await vm.agent.exec("/bin/sh").args(["-c", ids]).run()
    assert default.stdout == "1000:1000:1000:/home/user\n", default
    root = await vm.agent.exec("/bin/sh").args(["-c", ids]).user("root").run()
    assert root.stdout == "0:0:0:/root\n", root
    named = await vm.agent.exec("/bin/sh").args(["-c", ids]).user("app:staff").run()
    assert named.stdout == "1000:50:50:/home/user\n", named
    unknown = vm.agent.exec("/bin/true").user("nobody-here").run()
    with pytest.raises(capsa.AgentError, match="nobody-here"):
        await unknown


@pytest.mark.asyncio
@pytest.mark.timeout(300)
async def test_second_build_of_an_image_restores_its_template(
    sandbox_factory: object, busybox_image: capsa.Image, tmp_path: Path
) -> None:
    builder = capsa.sandbox().image(busybox_image).memory_mb(256)
    await sandbox_factory(builder)  # type: ignore[operator]  # records the template (or restores)
    again = await sandbox_factory(builder)  # type: ignore[operator]
    out = await again.agent.exec("cat").arg("/opt/new").run()
    assert out.stdout == "new\n"
    assert (await again.agent.info()).image == "bbtest"


@pytest.mark.timeout(300)
def test_custom_image_example_runs() -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "custom_image.py"
    done = subprocess.run(
        [sys.executable, str(example)], capture_output=True, text=True, timeout=240, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == 'PRETTY_NAME="busybox example image"\n'
