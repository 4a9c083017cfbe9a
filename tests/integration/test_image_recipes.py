"""Image recipes (``capsa.Image.debian()`` + steps) and ``warmup()`` on real guests.

Every image here copies a directory holding a token unique to the test session, so its layers are
built for real (never found in a previous session's cache); the fixture removes the layers, images
and templates it made. Wheels come from a directory of hand-made wheels (offline).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import capsa
from capsa.errors import ImageError
from capsa.recipes.recipe import layers_root, plan
from capsa.recipes.run import StepError
from capsa.sandbox.builder import template_root
from tests.unit.test_recipe import make_wheel, rebuilt

pytestmark = pytest.mark.vm


class Made:
    """Layers and templates the tests create, removed at the end."""

    def __init__(self) -> None:
        self.images: list[capsa.Image] = []

    def cleanup(self) -> None:
        layers: set[str] = set()
        for image in self.images:
            planned = plan(image)
            for item in planned[1:]:  # the base layer (its name only) is shared and tiny
                layers.add(str(layers_root() / item.key / "layer.sqfs"))
                shutil.rmtree(layers_root() / item.key, ignore_errors=True)
            directory = capsa.image.custom.images_root() / ("r" + planned[-1].key)
            shutil.rmtree(directory, ignore_errors=True)
        for template in template_root().iterdir() if template_root().is_dir() else []:
            try:
                record = json.loads((template / "snapshot.json").read_text())["record"]
            except (OSError, ValueError, KeyError):
                continue
            if {str(disk[0]) for disk in record.get("disks", [])} & layers:
                shutil.rmtree(template, ignore_errors=True)


@pytest.fixture(scope="module")
def made() -> Iterator[Made]:
    registry = Made()
    yield registry
    registry.cleanup()


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("recipe")
    app = root / "app"
    (app / "pkg").mkdir(parents=True)
    (app / "main.py").write_text("import pkg\nprint('app', pkg.NAME)\n")
    (app / "pkg" / "__init__.py").write_text("NAME = 'pkg'\n")
    (app / "token").write_text(uuid.uuid4().hex)  # this session's layers are new
    make_wheel(root / "wheels")
    local_apt_repo(root / "repo")
    return root


def local_apt_repo(repo: Path) -> Path:
    """A flat apt repository with one package whose postinst leaves a mark (maintainer scripts
    must run), served from the filesystem: apt_install never needs the mirror here."""
    if not (shutil.which("dpkg-deb") and shutil.which("dpkg-scanpackages")):
        pytest.skip("needs dpkg-deb and dpkg-scanpackages (dpkg-dev)")
    tree = repo.parent / "capsa-hello"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "usr" / "bin").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text(
        "Package: capsa-hello\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@example.org>\n"
        "Description: a test package\n"
    )
    postinst = tree / "DEBIAN" / "postinst"
    postinst.write_text("#!/bin/sh\nset -e\necho configured > /var/lib/capsa-hello\n")
    postinst.chmod(0o755)
    script = tree / "usr" / "bin" / "capsa-hello"
    script.write_text("#!/bin/sh\necho hello from a deb\n")
    script.chmod(0o755)
    repo.mkdir()
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(tree), str(repo)],
                   check=True, capture_output=True, timeout=60)  # fmt: skip
    packages = subprocess.run(["dpkg-scanpackages", "."], cwd=repo, check=True,
                              capture_output=True, timeout=60).stdout  # fmt: skip
    (repo / "Packages").write_bytes(packages)
    return repo


def recipe(sources: Path) -> capsa.Image:
    """Every step kind, offline (packages from a local apt repository, wheels from a directory)."""
    return (
        capsa.Image.debian(name="recipe-test", context=sources)
        .apt_install("capsa-hello", sources=f"deb [trusted=yes] file:{sources / 'repo'} ./")
        .pip_install("capsatiny", find_links=sources / "wheels")
        .copy(sources / "app", "/opt/app")
        .env("APP_MODE", "test")  # config only: not a disk, but the run() below sees it
        .run("python3 -m compileall -q /opt/app && rm /etc/issue && echo built $APP_MODE > /opt/marker")
        .workdir("/opt/app")
    )


@pytest.fixture(scope="module")
def built(made: Made, sources: Path) -> tuple[capsa.Image, list[str]]:
    image = recipe(sources)
    made.images.append(image)
    lines: list[str] = []
    image.build(progress=lines.append)
    return image, lines


@pytest.mark.asyncio
@pytest.mark.timeout(300)
async def test_a_recipe_with_every_step_kind(
    sandbox_factory: object, built: tuple[capsa.Image, list[str]]
) -> None:
    image, lines = built
    assert {f"step {i}/6" for i in range(1, 7)} <= set(rebuilt(lines))
    vm = await sandbox_factory(capsa.sandbox().image(image).memory_mb(384))  # type: ignore[operator]
    script = (
        'echo "$APP_MODE:$(pwd)"; python3 main.py; capsatiny; ls __pycache__ pkg/__pycache__; '
        "cat /opt/marker; test -e /etc/issue || echo issue-gone; capsa-hello; "
        "cat /var/lib/capsa-hello; dpkg-query -W -f '${Status}\\n' capsa-hello"
    )
    result = await vm.agent.exec("/bin/sh").args(["-c", script]).run()
    assert result.exit_code == 0, result
    lines_out = result.stdout.splitlines()
    assert lines_out[0] == "test:/opt/app"  # env() and workdir()
    assert "app pkg" in lines_out  # copy(): the directory's contents at /opt/app
    assert "capsatiny 1.0" in lines_out  # pip_install(): the module and its console script
    assert "main.cpython-311.pyc" in result.stdout  # run(): what the command wrote is kept
    assert "built test" in lines_out and "issue-gone" in lines_out  # ...and what it deleted
    # apt_install(): the package, its maintainer script's work, and dpkg knows it is installed.
    assert "hello from a deb" in lines_out and "configured" in lines_out
    assert "install ok installed" in lines_out
    assert (await vm.agent.info()).image == "recipe-test"
    # The layers are read-only in the guest: writes land in the sandbox's tmpfs layer only.
    await vm.agent.write_file("/opt/app/main.py", b"print('changed')\n")
    assert (await vm.agent.exec("python3").arg("main.py").run()).stdout == "changed\n"


@pytest.mark.timeout(120)
def test_changing_the_last_step_rebuilds_only_it(
    made: Made, sources: Path, built: tuple[capsa.Image, list[str]]
) -> None:
    changed = recipe(sources).workdir("/opt").env("LAST", "1")
    made.images.append(changed)
    lines: list[str] = []
    changed.build(progress=lines.append)
    assert rebuilt(lines) == ["step 7/8", "step 8/8"]  # the two new steps; 1-6 are cached
    other = recipe(sources).workdir("/opt").env("LAST", "2")
    made.images.append(other)
    lines.clear()
    result = other.build(progress=lines.append)
    assert rebuilt(lines) == ["step 8/8"]
    assert len(result.layers) == 5  # the 4 steps with files and the top (config) layer
    assert result.config.env[-1] == ("LAST", "2")


@pytest.mark.timeout(300)
def test_a_failing_run_step_raises_with_its_output(made: Made, sources: Path) -> None:
    image = recipe(sources).run("echo boom-output; echo on-stderr >&2; exit 3")
    made.images.append(image)
    with pytest.raises(StepError) as caught:
        image.build()
    error = caught.value
    assert isinstance(error, ImageError)
    assert error.exit_code == 3
    assert "boom-output" in error.output and "on-stderr" in error.output
    # Nothing half-built is visible: no metadata for the failed layer, no image record.
    top = plan(image)[-1]
    assert not (layers_root() / top.key / "layer.json").exists()
    assert not (capsa.image.custom.images_root() / ("r" + top.key) / "image.json").exists()


@pytest.mark.asyncio
@pytest.mark.timeout(300)
async def test_warmup_runs_once_before_the_template(
    sandbox_factory: object, built: tuple[capsa.Image, list[str]]
) -> None:
    image, _ = built
    builder = capsa.sandbox().image(image).memory_mb(384).warmup("echo warm >> /var/tmp/warm.log")
    for _ in range(2):  # the first build boots cold, warms and records; the second restores
        vm = await sandbox_factory(builder)  # type: ignore[operator]
        assert await vm.agent.read_file("/var/tmp/warm.log") == b"warm\n"
        await vm.stop()
    # The second one came from a template, which the warmup command keys.
    keyed = []
    layers = set(image.build().layers)
    for template in template_root().iterdir():
        try:
            record = json.loads((template / "snapshot.json").read_text())["record"]
        except (OSError, ValueError, KeyError):
            continue
        disks = {Path(disk[0]) for disk in record["disks"]}
        if disks == layers:
            keyed.append([arg for arg in record["cmdline"] if arg[0] == "capsa.warmup"])
    assert 1 in map(len, keyed)


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_a_failing_warmup_fails_the_build(
    sandbox_factory: object, built: tuple[capsa.Image, list[str]]
) -> None:
    image, _ = built
    builder = capsa.sandbox().image(image).memory_mb(256).cold().warmup("echo nope; exit 7")
    with pytest.raises(ImageError, match="exited with 7"):
        await sandbox_factory(builder)  # type: ignore[operator]


@pytest.mark.asyncio
@pytest.mark.timeout(300)
async def test_host_only_steps_on_an_imported_image(
    made: Made, sources: Path, tmp_path: Path, sandbox_factory: object
) -> None:
    """copy(), env() and workdir() stack on an imported OCI image (busybox only: no Python, no
    GNU tar); its own config (Env, WorkingDir) stays the base of the recipe's."""
    from tests.unit.test_oci import BUSYBOX, base_layer, docker_archive, top_layer

    if not BUSYBOX.exists():
        pytest.skip("needs a static /bin/busybox")
    archive = docker_archive(tmp_path / "bb.tar", [base_layer(), top_layer()])
    imported = capsa.Image.from_oci(archive, name=f"bb-{uuid.uuid4().hex[:8]}", context=sources)
    image = imported.copy(sources / "app", "app").env("APP_MODE", "oci").workdir("app")
    made.images.append(image)
    try:
        built = image.build()
        assert len(built.layers) == 3  # the import, the copy and the top (config) layer
        vm = await sandbox_factory(capsa.sandbox().image(image).memory_mb(256))  # type: ignore[operator]
        script = 'echo "$GREETING:$APP_MODE:$(pwd)"; cat main.py; cat /opt/new; ls /usr/bin/python3'
        result = await vm.agent.exec("/bin/sh").args(["-c", script]).run()
        lines = result.stdout.splitlines()
        assert lines[0] == "a=b:oci:/srv/app", result  # the image's Env/WorkingDir, then the steps
        assert "import pkg" in lines[1] and "new" in lines  # the copy, over the imported root
        assert result.exit_code != 0  # still no Python: the recipe did not add capsa's root
    finally:
        key = capsa.image.custom.oci_base(imported.source, imported.name)[0]
        shutil.rmtree(capsa.image.custom.images_root() / key, ignore_errors=True)
