"""The bounded reader of a build VM's capture, on honest archives (GNU tar's, as the guest writes
them), and the recipe context's rules for what a copy may name. The attacks are in
tests/security/test_image_builder.py."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

import capsa
from capsa.errors import ConfigError, ImageError
from capsa.recipes.capture import CaptureError, Reader, add_captured, written_bytes
from capsa.recipes.layertar import LayerTar, add_host_tree


def _layer_members(write: object) -> dict[str, tarfile.TarInfo]:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        write(LayerTar(tar))  # type: ignore[operator]
    buffer.seek(0)
    with tarfile.open(fileobj=buffer) as tar:
        return {m.name: m for m in tar.getmembers()}


def _on_disk(tmp_path: Path, archive: bytes) -> Path:
    disk = tmp_path / "output.img"
    with disk.open("wb") as fh:
        fh.truncate(1 << 30)
        fh.write(archive)
    return disk


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar")
def test_gnu_tars_pax_archive_is_read_whole(tmp_path: Path) -> None:
    """What the guest's capture writes (GNU tar, PAX, numeric owners) comes through intact: a
    long name, a hard link, a symlink, a FIFO, modes, ownership and file data."""
    upper = tmp_path / "upper"
    deep = upper / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    (deep / "data.bin").write_bytes(os.urandom(70_000))
    (upper / "tool").write_text("#!/bin/sh\n")
    (upper / "tool").chmod(0o4755)
    os.link(upper / "tool", upper / "tool-again")
    (upper / "link").symlink_to("/etc/passwd")
    os.mkfifo(upper / "pipe")
    archive = subprocess.run(
        ["tar", "--format=pax", "--numeric-owner", "-C", str(upper), "-cf", "-", "."],
        check=True, capture_output=True, timeout=60,
    ).stdout  # fmt: skip
    disk = _on_disk(tmp_path, archive)
    with disk.open("rb") as fh:
        assert written_bytes(fh) >= len(archive)
        members = _layer_members(lambda layer: add_captured(layer, fh))
    data = members[f"rootfs/{deep.relative_to(upper)}/data.bin"]
    assert data.size == 70_000
    assert members["rootfs/tool"].mode == 0o4755
    assert members["rootfs/tool-again"].islnk() or members["rootfs/tool"].islnk()
    assert members["rootfs/link"].issym() and members["rootfs/link"].linkname == "/etc/passwd"
    assert members["rootfs/pipe"].isfifo()


def test_a_truncated_or_corrupt_capture_is_refused(tmp_path: Path) -> None:
    info = tarfile.TarInfo("file")
    info.size = 5000
    header = info.tobuf(format=tarfile.GNU_FORMAT)
    corrupt = header[:100] + b"\x01" + header[101:]
    sparse = tarfile.TarInfo("holes")
    sparse.type = tarfile.GNUTYPE_SPARSE
    for archive in (header + b"x" * 100, corrupt, sparse.tobuf(format=tarfile.GNU_FORMAT)):
        disk = _on_disk(tmp_path, archive)
        with disk.open("rb") as fh, pytest.raises(CaptureError):
            list(Reader(fh, written_bytes(fh)))


def test_copy_sources_resolve_inside_the_context(tmp_path: Path) -> None:
    """Relative to the context, or absolute inside it; a symlink given as the source is followed
    when it stays inside; symlinks below a copied directory are copied as links, never followed."""
    context = tmp_path / "ctx"
    (context / "app").mkdir(parents=True)
    (context / "app" / "main.py").write_text("x")
    (context / "app" / "passwd").symlink_to("/etc/passwd")
    (context / "current").symlink_to("app")
    image = capsa.Image.debian(context=context)
    for source in ("app", context / "app", "current", "./app/../app"):
        assert image.copy(source, "/opt/app").steps[-1].args[0] == str(context / "app")
    with pytest.raises(ConfigError, match="does not exist"):
        image.copy("missing", "/x")
    members = _layer_members(lambda layer: add_host_tree(layer, context / "app", "/opt/app"))
    assert members["rootfs/opt/app/passwd"].issym()
    assert members["rootfs/opt/app/passwd"].linkname == "/etc/passwd"


def test_a_copy_source_swapped_for_a_symlink_after_the_recipe_was_read_is_refused(
    tmp_path: Path,
) -> None:
    context = tmp_path / "ctx"
    (context / "app").mkdir(parents=True)
    step = capsa.Image.debian(context=context).copy("app", "/opt/app").steps[-1]
    (context / "app").rmdir()
    (context / "app").symlink_to(tmp_path)
    with pytest.raises(ImageError, match="changed since"):
        _layer_members(lambda layer: add_host_tree(layer, Path(step.args[0]), "/opt/app"))
