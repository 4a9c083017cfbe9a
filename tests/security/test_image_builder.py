"""Attacks on the image builder: hostile recipes, wheels, indexes and build-VM guests trying to run
code on the host, read host files into an image, or make the host read or hold gigabytes.

Everything here runs on the host without a VM, except the last test, whose build VM's guest (root
there) replaces ``tar`` to write a crafted archive where the host reads a step's changes.
"""

from __future__ import annotations

import io
import shutil
import tarfile
import tempfile
import time
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import pytest

import capsa
from capsa.errors import CapsaError, ConfigError, ImageError
from capsa.image.custom import images_root
from capsa.recipes.layertar import LayerTar
from capsa.recipes.pip import add_wheels
from capsa.recipes.recipe import layers_root, plan
from capsa.recipes.toml import load_recipe
from tests.unit.test_recipe import make_wheel

MARKER = "host-code-ran"


class _Sink:
    """Where a layer's tar goes in these tests: counted, never kept (a hostile input may be huge)."""

    def __init__(self) -> None:
        self.written = 0
        self.names: list[str] = []
        self.data = bytearray()  # the first MiB, to look for leaked content

    def tell(self) -> int:
        return self.written

    def write(self, data: bytes) -> int:
        self.written += len(data)
        if len(self.data) < 1 << 20:
            self.data += data[: (1 << 20) - len(self.data)]
        return len(data)


def _layer(write: Callable[[LayerTar], object], sink: _Sink | None = None) -> _Sink:
    sink = sink or _Sink()
    with tarfile.open(fileobj=sink, mode="w", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
        write(LayerTar(tar))
    return sink


def _evil_project(root: Path, marker: Path) -> Path:
    """A source tree whose in-tree PEP 517 backend (no build requirements) writes ``marker``."""
    project = root / "evilbuild"
    project.mkdir(parents=True)
    (project / "pyproject.toml").write_text(
        '[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n'
    )
    (project / "backend.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text({MARKER!r})\n"
        "def get_requires_for_build_wheel(config_settings=None):\n    return []\n"
    )
    return project


@pytest.fixture
def context(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A recipe's context directory, also the current directory (the default context)."""
    folder = tmp_path / "context"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


# -- 1. pip_install runs nothing on the host --


def test_a_wheel_requiring_a_local_project_runs_no_build_backend(context: Path) -> None:
    """Host code execution: a wheel from the recipe's wheel directory ``Requires-Dist``s
    ``evilbuild @ file:///...``, a source tree whose build backend pip would run on the host (as
    root in CI) to read its metadata, ``--only-binary=:all:`` notwithstanding."""
    marker = context.parent / "marker"
    project = _evil_project(context.parent, marker)
    make_wheel(context / "wheels", "capsaevil", requires=(f"evilbuild @ {project.as_uri()}",))
    step = capsa.Image.debian().pip_install("capsaevil", find_links="wheels").steps[-1]
    with pytest.raises(ImageError, match="never runs on the host"):
        _layer(lambda layer: add_wheels(layer, step))
    assert not marker.exists(), "a build backend ran on the host"


@pytest.mark.parametrize(
    "requirement",
    [
        "{project}",  # a local path: pip builds it
        "evilbuild @ {uri}",  # a direct reference
        "evilbuild@{uri}",
        "evilbuild @ http://127.0.0.1:9/evilbuild-1.0.tar.gz",
        "git+https://127.0.0.1:9/evil.git#egg=evilbuild",
        "./evilbuild",
        "evilbuild-1.0.tar.gz",
        "capsatiny --index-url=http://127.0.0.1:9/",
        "capsatiny; python_version > '3' @ {uri}",
    ],
)
def test_requirements_naming_code_are_refused_before_pip_runs(context: Path, requirement: str) -> None:
    """Host code execution: a requirement that is a path, URL, archive, VCS link or direct
    reference (or smuggles a pip option) is a ConfigError when the step is made, before pip."""
    marker = context.parent / "marker"
    project = _evil_project(context, marker)
    make_wheel(context / "wheels")
    text = requirement.format(project=project, uri=project.as_uri())
    with pytest.raises(ConfigError):
        step = capsa.Image.debian().pip_install(text, find_links="wheels").steps[-1]
        _layer(lambda layer: add_wheels(layer, step))  # on a lax builder: what the step does
    assert not marker.exists(), "a build backend ran on the host"


def test_a_pip_package_in_the_current_directory_is_not_run(context: Path) -> None:
    """Host code execution: the recipe's folder (the current directory of ``capsa image build``)
    holds a ``pip/`` package; ``python -m pip`` would import it instead of pip."""
    marker = context.parent / "marker"
    (context / "pip").mkdir()
    (context / "pip" / "__init__.py").write_text("")
    (context / "pip" / "__main__.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text({MARKER!r})\n"
    )
    make_wheel(context / "wheels")
    step = capsa.Image.debian().pip_install("capsatiny", find_links="wheels").steps[-1]
    try:
        sink = _layer(lambda layer: add_wheels(layer, step))
    finally:
        assert not marker.exists(), "a pip package from the current directory ran"
    assert sink.written > 0


def test_a_wheel_requiring_a_host_wheel_by_path_is_refused(context: Path) -> None:
    """Host file read: a wheel ``Requires-Dist``s ``secret @ file:///<a wheel elsewhere on the
    host>``; pip fetches it (no build needed) and it would land in the image."""
    secret = make_wheel(context.parent / "private", "capsasecret")
    make_wheel(context / "wheels", "capsaleak", requires=(f"capsasecret @ {secret.as_uri()}",))
    step = capsa.Image.debian().pip_install("capsaleak", find_links="wheels").steps[-1]
    sink = _Sink()
    with pytest.raises(ImageError, match="direct reference"):
        _layer(lambda layer: add_wheels(layer, step), sink)
    assert b"capsasecret" not in sink.data


# -- 2. copy reads only the recipe's context --


@pytest.fixture
def host_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake home with ``.ssh/id_ed25519``, outside the context."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("PRIVATE KEY\n")
    monkeypatch.setenv("HOME", str(home))
    return home / ".ssh"


@pytest.mark.parametrize(
    "source", ["../home/.ssh", "{ssh}", "~/.ssh", "inner/escape/id_ed25519", "app/../../home/.ssh"]
)
def test_a_toml_recipe_cannot_copy_host_files_outside_its_directory(
    context: Path, host_secret: Path, source: str
) -> None:
    """Host file read: an untrusted recipe copies ``../``, an absolute path, ``~/.ssh``, or a
    symlink (or a path through one) leaving the recipe's directory, baking the host's keys into
    the image."""
    (context / "app").mkdir()
    (context / "inner").mkdir()
    (context / "inner" / "escape").symlink_to(host_secret)
    recipe = context / "recipe.toml"
    recipe.write_text(f'[[steps]]\ncopy = "{source.format(ssh=host_secret)}"\nto = "/root/.ssh"\n')
    with pytest.raises(ConfigError, match=r"context|home directories"):
        image = load_recipe(recipe)
        plan(image)  # on a lax builder: the copy's content is read here
        pytest.fail(f"the recipe copies {image.steps[-1].args[0]}")


def test_a_python_recipe_copies_only_from_its_context(context: Path, host_secret: Path) -> None:
    """Host file read: without ``context=``, a recipe built in Python reads only below the
    current directory; ``..`` and an absolute path elsewhere are refused."""
    for source in ("../home/.ssh", str(host_secret), "~/.ssh"):
        with pytest.raises(ConfigError):
            capsa.Image.debian().copy(source, "/root/.ssh")
    with pytest.raises(ConfigError):
        capsa.Image.debian(context=context).copy(host_secret, "/x")


def test_a_toml_recipe_cannot_read_a_wheel_directory_outside_its_directory(
    context: Path, host_secret: Path
) -> None:
    """Host file read: ``find_links`` names a directory outside the recipe's folder (the host's
    private wheels), or a ``file:`` index."""
    make_wheel(host_secret.parent / "wheels", "capsasecret")
    for links in ('find_links = "../home/wheels"', f'find_links = "{host_secret.parent}/wheels"',
                  f'index_url = "{(host_secret.parent / "wheels").as_uri()}"'):  # fmt: skip
        recipe = context / "recipe.toml"
        recipe.write_text(f'[[steps]]\npip_install = "capsasecret"\n{links}\n')
        with pytest.raises(ConfigError):
            load_recipe(recipe)


# -- 3. wheels and build-VM output are bounded --


def _bomb(folder: Path, mib: int) -> Path:
    """A valid wheel (``capsabomb``) plus one ``mib`` MiB file of zeros: a few hundred KiB."""
    wheel = make_wheel(folder, "capsabomb")
    with (
        zipfile.ZipFile(wheel, "a", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive,
        archive.open("capsabomb/zeros.bin", "w", force_zip64=True) as out,
    ):
        chunk = bytes(1 << 20)
        for _ in range(mib):
            out.write(chunk)
    return wheel


def test_a_zip_bomb_wheel_is_refused_quickly(context: Path) -> None:
    """Resource exhaustion: a ~400 KiB wheel expands to 400 MiB, read into memory and then into
    the layer; it must be refused at once, before anything is inflated, leaving nothing behind."""
    wheel = _bomb(context / "wheels", 400)
    assert wheel.stat().st_size < 1 << 20
    step = capsa.Image.debian().pip_install("capsabomb", find_links="wheels").steps[-1]
    before = set(Path(tempfile.gettempdir()).glob("capsa-wheels-*"))
    sink = _Sink()
    started = time.monotonic()
    with pytest.raises(ImageError, match=r"expands to|inflates past"):
        _layer(lambda layer: add_wheels(layer, step), sink)
    elapsed = time.monotonic() - started
    print(f"zip bomb ({wheel.stat().st_size >> 10} KiB -> 400 MiB) refused in {elapsed:.1f}s")
    assert sink.written < 1 << 20  # nothing of it reached the layer
    assert set(Path(tempfile.gettempdir()).glob("capsa-wheels-*")) == before


class _Counting(io.RawIOBase):
    """A file's reads, counted (how much of a disk the host read)."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.read_bytes = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.raw.fileno()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def readinto(self, buffer: Any) -> int:
        got = self.raw.readinto(buffer)  # type: ignore[attr-defined]
        self.read_bytes += got
        return int(got)


def _disk(tmp_path: Path, head: bytes, size: int = 8 << 30) -> Path:
    """A sparse output disk whose only written bytes are ``head`` (what a guest wrote)."""
    disk = tmp_path / "output.img"
    with disk.open("wb") as fh:
        fh.truncate(size)
        fh.write(head)
    return disk


def _capture(disk: Path) -> tuple[_Counting, _Sink | None, BaseException | None]:
    try:
        from capsa.recipes.capture import add_captured
    except ImportError:  # before the fix: the capture parser lived in recipe_run
        from capsa.recipes.run import add_captured  # type: ignore[attr-defined,no-redef]
    with disk.open("rb") as raw:
        counting = _Counting(raw)
        sink = _Sink()
        try:
            with tarfile.open(fileobj=sink, mode="w", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
                add_captured(LayerTar(tar), io.BufferedReader(counting))  # type: ignore[arg-type]
        except CapsaError as exc:
            return counting, sink, exc
        return counting, sink, None


def _header(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    return info.tobuf(format=tarfile.GNU_FORMAT)


def test_a_guest_archive_claiming_gigabytes_makes_the_host_read_nothing(tmp_path: Path) -> None:
    """Resource exhaustion: a 512-byte header on the build VM's sparse output disk says its file
    holds 2 GiB; the host would read (and squash) 2 GiB of a disk the guest never wrote."""
    disk = _disk(tmp_path, _header("big", 2 << 30))
    counting, sink, error = _capture(disk)
    assert isinstance(error, ImageError), "the claim was believed"
    assert counting.read_bytes < 1 << 20 and sink is not None and sink.written < 1 << 20


def test_a_guest_pax_header_claiming_512_mib_is_not_held_in_memory(tmp_path: Path) -> None:
    """Resource exhaustion: a PAX extended header (held in memory whole by tarfile) claiming
    512 MiB, 8 MiB of it really written by the guest."""
    body = b"x" * (8 << 20)
    disk = _disk(tmp_path, _header("././@PaxHeader", 512 << 20, tarfile.XHDTYPE) + body)
    counting, _, error = _capture(disk)
    assert isinstance(error, ImageError)
    assert counting.read_bytes < 4 << 20, f"read {counting.read_bytes} bytes of a PAX header"


def test_a_guest_hard_link_out_of_the_image_root_is_refused(tmp_path: Path) -> None:
    """Path traversal: the guest's archive holds a hard link to ``../../../etc/shadow``."""
    info = tarfile.TarInfo("usr/lib/x")
    info.type, info.linkname = tarfile.LNKTYPE, "../../../etc/shadow"
    disk = _disk(tmp_path, info.tobuf(format=tarfile.PAX_FORMAT) + bytes(1024), size=1 << 20)
    _, _, error = _capture(disk)
    assert isinstance(error, ImageError)


# A `tar` for the build VM's capture: writes one header claiming 3 GiB where the real tar would go.
_FAKE_TAR = """#!/usr/bin/python3
import os, sys, tarfile
out = sys.argv[sys.argv.index("-cf") + 1]
info = tarfile.TarInfo("big")
info.size = 3 << 30
with open(out, "r+b") as fh:
    fh.write(info.tobuf(format=tarfile.GNU_FORMAT))
    os.fsync(fh.fileno())
"""


@pytest.mark.vm
@pytest.mark.timeout(420)
def test_a_build_vm_writing_a_hostile_archive_is_refused() -> None:
    """Resource exhaustion from a build VM: the run() step (root in its VM) replaces ``tar``, so
    the capture writes a 512-byte header claiming a 3 GiB file onto the sparse output disk; the
    host must refuse it without reading gigabytes or building a layer."""
    token = uuid.uuid4().hex
    command = (
        f"echo {token} > /token && tar=$(command -v tar) && "
        f"printf '%s' '{_FAKE_TAR}' > \"$tar\" && chmod 755 \"$tar\""
    )
    image = capsa.Image.debian(name="hostile-capture").run(command, timeout=120)
    planned = plan(image)
    try:
        started = time.monotonic()
        with pytest.raises(ImageError, match="capture") as caught:
            image.build()
        elapsed = time.monotonic() - started
        print(f"hostile capture refused; the build took {elapsed:.1f}s: {caught.value.message}")
        top = layers_root() / planned[-1].key
        assert not (top / "layer.sqfs").exists() and not (top / "layer.json").exists()
        assert not list(top.glob(".*.part*"))
    finally:  # (a lax builder makes the layer and the image)
        for item in planned[1:]:
            shutil.rmtree(layers_root() / item.key, ignore_errors=True)
        shutil.rmtree(images_root() / ("r" + planned[-1].key), ignore_errors=True)


@pytest.mark.skipif(shutil.which("tar2sqfs") is None, reason="needs squashfs-tools-ng")
def test_a_huge_dpkg_status_written_by_a_guest_is_not_read_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Resource exhaustion: a run() step (root in its VM) leaves a huge /var/lib/dpkg/status in its
    layer; the next apt_install reads it on the host, where it would be held in memory whole."""
    from capsa.image.layers import squash
    from capsa.recipes import apt as recipe_apt

    monkeypatch.setattr(recipe_apt, "MAX_STATUS", 1 << 20, raising=False)  # the default: 256 MiB

    def write(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo("rootfs/var/lib/dpkg/status")
        info.size = 8 << 20
        tar.addfile(info, io.BytesIO(b"Package: x\n" * (info.size // 11) + b"\n" * (info.size % 11)))

    layer = squash(write, tmp_path / "layer.sqfs")
    with pytest.raises(ImageError, match="over"):
        recipe_apt.guest_status([layer], tmp_path / "no-rootfs")
