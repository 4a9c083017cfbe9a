"""Image recipes without a VM: step validation, layer keys, Docker COPY semantics, wheels, TOML."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import capsa
from capsa.errors import ConfigError, ImageError
from capsa.image.sandbox import sandbox_image
from capsa.recipes.apt import _uris
from capsa.recipes.layertar import LayerTar, add_host_tree
from capsa.recipes.pip import SITE, add_wheels
from capsa.recipes.recipe import build_recipe, layers_root, plan
from capsa.recipes.toml import load_recipe


def make_wheel(
    dest: Path,
    name: str = "capsatiny",
    version: str = "1.0",
    tag: str = "py3-none-any",
    requires: tuple[str, ...] = (),
) -> Path:
    """A minimal pure-Python wheel with a console script, written by hand (no network, no build)."""
    files = {
        f"{name}/__init__.py": f"VALUE = {version!r}\ndef main():\n    print('{name}', VALUE)\n".encode(),
        f"{name}-{version}.dist-info/METADATA": (
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
            + "".join(f"Requires-Dist: {req}\n" for req in requires)
        ).encode(),
        f"{name}-{version}.dist-info/WHEEL": (
            f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: {tag}\n".encode()
        ),
        f"{name}-{version}.dist-info/entry_points.txt": f"[console_scripts]\n{name} = {name}:main\n".encode(),
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{name}-{version}.dist-info/RECORD,,")
    files[f"{name}-{version}.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    dest.mkdir(parents=True, exist_ok=True)
    wheel = dest / f"{name}-{version}-{tag}.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)
    return wheel


def _members(write: object) -> dict[str, tarfile.TarInfo]:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        write(LayerTar(tar))  # type: ignore[operator]
    buffer.seek(0)
    with tarfile.open(fileobj=buffer) as tar:
        return {m.name: m for m in tar.getmembers()}


def test_steps_validate_at_the_call(tmp_path: Path) -> None:
    image = capsa.Image.debian()
    with pytest.raises(ConfigError):
        image.env("1BAD", "x")
    with pytest.raises(ConfigError):
        image.copy(tmp_path / "missing", "/x")
    with pytest.raises(ConfigError):
        image.run("   ")
    with pytest.raises(ConfigError):
        image.pip_install("--index-url=http://evil")
    with pytest.raises(ConfigError):
        image.apt_install("git; rm -rf /")
    with pytest.raises(ConfigError):
        image.apt_install("git", sources="rm -rf /")
    imported = capsa.Image.from_oci(tmp_path / "x.tar")
    assert imported.env("A", "b").workdir("/w").steps  # host-only steps stack on an import
    for refused in (lambda: imported.run("true"), lambda: imported.pip_install("six"),
                    lambda: imported.apt_install("jq")):  # fmt: skip
        with pytest.raises(ConfigError, match=r"Image\.debian") as caught:
            refused()
        assert "copy(), env() and workdir()" in (caught.value.hint or "")


def test_changing_the_last_step_changes_only_its_key(tmp_path: Path) -> None:
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "main.py").write_text("print(1)\n")
    common = (
        capsa.Image.debian(name="t", context=tmp_path).copy(tmp_path / "app", "/opt/app").env("A", "1")
    )
    first = plan(common.run("echo one"))
    second = plan(common.run("echo two"))
    assert [p.key for p in first[:-1]] == [p.key for p in second[:-1]]
    assert first[-1].key != second[-1].key
    # Changing a copied file's content changes the copy layer and every layer above it.
    (tmp_path / "app" / "main.py").write_text("print(2)\n")
    third = plan(common.run("echo one"))
    assert third[0].key == first[0].key
    assert all(a.key != b.key for a, b in zip(first[1:], third[1:], strict=True))


def test_env_and_workdir_accumulate_in_the_config() -> None:
    image = capsa.Image.debian().env("A", "1").workdir("/opt").env("A", "2").workdir("app")
    top = plan(image)[-1].config
    assert top.env == (("A", "2"),)
    assert top.workdir == "/opt/app"


def test_copy_follows_docker_semantics(tmp_path: Path) -> None:
    src = tmp_path / "app"
    (src / "sub").mkdir(parents=True)
    (src / "main.py").write_text("x")
    (src / "run.sh").write_text("#!/bin/sh\n")
    (src / "run.sh").chmod(0o750)
    (src / "link").symlink_to("main.py")
    single = tmp_path / "one.txt"
    single.write_text("1")

    def write(layer: LayerTar) -> None:
        add_host_tree(layer, src, "/opt/app")  # a directory's contents land at dst
        add_host_tree(layer, single, "/etc/")  # into a directory
        add_host_tree(layer, single, "/etc/renamed.txt")  # to a file name

    members = _members(write)
    assert "rootfs/opt/app/main.py" in members and "rootfs/opt/app/app" not in members
    assert members["rootfs/opt/app/run.sh"].mode == 0o750
    assert members["rootfs/opt/app/run.sh"].uid == 0
    assert (
        members["rootfs/opt/app/link"].issym() and members["rootfs/opt/app/link"].linkname == "main.py"
    )
    assert members["rootfs/opt"].isdir()
    assert "rootfs/etc/one.txt" in members and "rootfs/etc/renamed.txt" in members


def test_wheels_unpack_into_the_guests_site_packages(tmp_path: Path) -> None:
    make_wheel(tmp_path / "wheels")
    step = (
        capsa.Image.debian(context=tmp_path)
        .pip_install("capsatiny", find_links=tmp_path / "wheels")
        .steps[-1]
    )
    members = _members(lambda layer: add_wheels(layer, step))
    assert f"rootfs/{SITE}/capsatiny/__init__.py" in members
    assert f"rootfs/{SITE}/capsatiny-1.0.dist-info/METADATA" in members
    script = members["rootfs/usr/local/bin/capsatiny"]
    assert script.mode == 0o755


@pytest.fixture
def pep503_index(tmp_path: Path) -> Iterator[str]:
    """A PEP 503 index on 127.0.0.1 (``python -m http.server``): ``capsaidx`` 1.0, which needs
    ``capsadep``. Yields its /simple URL."""
    root = tmp_path / "index"
    files = root / "files"
    wheels = [make_wheel(files, "capsaidx", "1.0", requires=("capsadep>=1",)),
              make_wheel(files, "capsadep", "2.0")]  # fmt: skip
    for wheel in wheels:
        project = wheel.name.split("-")[0]
        page = root / "simple" / project / "index.html"
        page.parent.mkdir(parents=True)
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        page.write_text(f'<a href="../../files/{wheel.name}#sha256={digest}">{wheel.name}</a>\n')
    proc = subprocess.Popen(
        [sys.executable, "-u", "-m", "http.server", "--bind", "127.0.0.1", "0"],
        cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "Serving HTTP on 127.0.0.1 port N (http://...) ..."
        port = int(line.split(" port ")[1].split()[0])
        yield f"http://127.0.0.1:{port}/simple"
    finally:
        proc.terminate()
        proc.wait(10)


def test_pip_install_from_an_index_on_localhost_uses_only_that_index(
    tmp_path: Path, pep503_index: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Source confusion: with ``index_url=`` the wheels (and their dependencies) come from that
    index alone, never from sources the host's pip configuration adds (``find-links``,
    ``extra-index-url`` in pip.conf or PIP_* variables), which here offer a newer decoy."""
    decoys = tmp_path / "decoys"
    make_wheel(decoys, "capsaidx", "9.0")
    make_wheel(decoys, "capsadep", "9.0")
    monkeypatch.setenv("PIP_FIND_LINKS", str(decoys))
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", decoys.as_uri())
    conf = tmp_path / "pip.conf"
    conf.write_text(f"[global]\nfind-links = {decoys}\n")
    monkeypatch.setenv("PIP_CONFIG_FILE", str(conf))
    step = capsa.Image.debian().pip_install("capsaidx", index_url=pep503_index).steps[-1]
    members = _members(lambda layer: add_wheels(layer, step))
    dist = sorted(name.split("/")[-2] for name in members if name.endswith(".dist-info/METADATA"))
    assert dist == ["capsadep-2.0.dist-info", "capsaidx-1.0.dist-info"]
    assert f"rootfs/{SITE}/capsaidx/__init__.py" in members


def test_a_wheel_missing_for_the_guests_python_is_an_image_error(tmp_path: Path) -> None:
    make_wheel(tmp_path / "wheels", name="onlynew", tag="cp312-cp312-manylinux_2_17_x86_64")
    image = capsa.Image.debian(context=tmp_path)
    for requirement in ("onlynew", "doesnotexist"):
        step = image.pip_install(requirement, find_links=tmp_path / "wheels").steps[-1]
        with pytest.raises(ImageError) as caught:
            _members(lambda layer, step=step: add_wheels(layer, step))
        assert "no binary wheel for the guest's Python" in (caught.value.hint or "")


def test_toml_recipe_gives_the_same_steps(tmp_path: Path) -> None:
    (tmp_path / "app").mkdir()
    (tmp_path / "wheels").mkdir()
    recipe = tmp_path / "img.toml"
    recipe.write_text(
        """
name = "web"
[[steps]]
apt_install = ["git", "jq"]
sources = "deb [trusted=yes] http://127.0.0.1:8000/ ./"
[[steps]]
pip_install = "capsatiny"
find_links = "wheels"
[[steps]]
copy = "app"
to = "/opt/app"
[[steps]]
run = "python3 -m compileall -q /opt/app"
timeout = 60
[[steps]]
env = {APP_MODE = "test"}
[[steps]]
workdir = "/opt/app"
"""
    )
    loaded = load_recipe(recipe)
    expected = (
        capsa.Image.debian(name="web", context=tmp_path)
        .apt_install("git", "jq", sources="deb [trusted=yes] http://127.0.0.1:8000/ ./")
        .pip_install("capsatiny", find_links=tmp_path / "wheels")
        .copy(tmp_path / "app", "/opt/app")
        .run("python3 -m compileall -q /opt/app", timeout=60)
        .env("APP_MODE", "test")
        .workdir("/opt/app")
    )
    assert loaded == expected


@pytest.mark.parametrize(
    "text",
    [
        "[[steps]]\nrun = 'a'\ncopy = 'b'\n",  # two kinds in one step
        "[[steps]]\ncopy = 'x'\n",  # no destination
        "[[steps]]\nrun = 'a'\nnetwork = 'yes'\n",
        "base = 'alpine'\n",
        "colour = 1\n",
        "steps = 'run'\n",
        "[[steps\n",
    ],
)
def test_malformed_toml_recipes_are_config_errors(tmp_path: Path, text: str) -> None:
    recipe = tmp_path / "bad.toml"
    recipe.write_text(text)
    with pytest.raises(ConfigError):
        load_recipe(recipe)


def rebuilt(lines: list[str]) -> list[str]:
    """Which layers a build's progress lines say were built (``base``, ``step 2/3``...)."""
    return [line.split(":")[0] for line in lines if line.endswith(": building")]


def _rootfs_built() -> bool:
    try:
        sandbox_image(build=False)
    except ImageError:
        return False
    return shutil.which("tar2sqfs") is not None


@pytest.mark.skipif(not _rootfs_built(), reason="needs the default sandbox image and tar2sqfs")
def test_an_interrupted_layer_is_built_again(tmp_path: Path) -> None:
    """Host-only steps (no VM): a layer whose metadata was never written (the build was killed
    after squashing, before its metadata) is built again; the layers below it are not."""
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "token").write_text(str(tmp_path))  # unique: never cached before
    image = (
        capsa.Image.debian(name="interrupt", context=tmp_path)
        .copy(tmp_path / "app", "/opt/app")
        .env("X", "1")
    )
    planned = plan(image)
    try:
        lines: list[str] = []
        built = build_recipe(image, lines.append)
        assert len(built.layers) == 2  # the copy and the top (env: config only) layer
        assert {"step 1/2", "step 2/2"} <= set(rebuilt(lines))
        # kill -9 between the layer and its metadata; the image record goes too (as if never made).
        (layers_root() / planned[-1].key / "layer.json").unlink()
        shutil.rmtree(built.directory)
        lines.clear()
        again = build_recipe(image, lines.append)
        assert rebuilt(lines) == ["step 2/2"]
        meta = json.loads((again.directory / "image.json").read_text())
        assert meta["config"]["env"] == [["X", "1"]]
    finally:
        for item in planned[1:]:
            shutil.rmtree(layers_root() / item.key, ignore_errors=True)
        shutil.rmtree(built.directory, ignore_errors=True)


def test_apt_package_uris_are_read_from_print_uris() -> None:
    output = (
        "Reading package lists...\n"
        "'http://deb.debian.org/debian/pool/main/j/jq/jq_1.6-2.1_amd64.deb' jq_1.6-2.1_amd64.deb 1 SHA256:ab\n"
        "'file:/srv/repo/./capsa-hello_1.0_all.deb' capsa-hello_1.0_all.deb 2 SHA256:cd\n"
    )
    assert _uris(output) == [
        "http://deb.debian.org/debian/pool/main/j/jq/jq_1.6-2.1_amd64.deb",
        "file:/srv/repo/./capsa-hello_1.0_all.deb",
    ]


def test_a_wheel_entry_escaping_its_root_is_refused(tmp_path: Path) -> None:
    wheel = make_wheel(tmp_path / "wheels")
    with zipfile.ZipFile(wheel, "a") as archive:
        archive.writestr("../../etc/cron.d/evil", b"* * * * * root sh\n")
    step = (
        capsa.Image.debian(context=tmp_path)
        .pip_install("capsatiny", find_links=tmp_path / "wheels")
        .steps[-1]
    )
    with pytest.raises(ImageError, match="escaping its root"):
        _members(lambda layer: add_wheels(layer, step))


@pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="needs e2fsprogs")
def test_build_vm_disks_are_sparse_tagged_and_swept(tmp_path: Path) -> None:
    """The build VM's scratch and output disks cost the host only what is written, carry the
    tags the guest's init looks for, and a dead build's leftovers are removed (a live one's kept)."""
    from capsa.image.sandbox import BUILD_OUTPUT_TAG, BUILD_SCRATCH_TAG
    from capsa.recipes.run import MAX_LAYER_BYTES, SCRATCH_BYTES, _make_disks, _sweep_scratch

    output, scratch = _make_disks(tmp_path)
    assert scratch is not None
    for disk, size, tag in ((output, MAX_LAYER_BYTES, BUILD_OUTPUT_TAG),
                            (scratch, SCRATCH_BYTES, BUILD_SCRATCH_TAG)):  # fmt: skip
        st = disk.stat()
        assert st.st_size == size and st.st_blocks * 512 < 64 << 20  # sparse
        with disk.open("rb") as fh:
            assert fh.read(16) == tag
    with scratch.open("rb") as fh:  # still an ext4 file system behind the tag
        fh.seek(1024 + 0x38)
        assert fh.read(2) == b"\x53\xef"
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "sweep" / f"{dead.pid}-x").mkdir(parents=True)
    (tmp_path / "sweep" / f"{os.getpid()}-y").mkdir()
    _sweep_scratch(tmp_path / "sweep")
    assert [p.name for p in (tmp_path / "sweep").iterdir()] == [f"{os.getpid()}-y"]
