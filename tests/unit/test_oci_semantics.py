"""The merge against a reference model of Docker's layer application (overlay2 / OCI changesets).

The model applies each layer's entries in order into the layer's own changeset, as moby's
``UnpackLayer`` does into the layer's empty diff directory: an entry replaces what the layer had at
its path (a directory over a directory only takes the new metadata; anything else removes the old
entry and what the layer put below it), and an entry below a non-directory of its layer fails.
Whiteouts are entries there too (overlay2 makes a device node of one, and an opaque marker is an
xattr of its directory): a later entry replacing them, or a directory above them, removes them, and
a whiteout over a path the layer already has fails (mknod: EEXIST). The
changesets then stack as overlayfs stacks the diff directories: whiteouts and opaque markers hide
the lower layers' paths, a directory over a directory merges, anything else hides the lower path
and its subtree. Hypothesis generates small layers over a handful of names, with repeats,
whiteouts and opaque markers (first in their layer, as the OCI spec asks of writers), and the
merged tar capsa streams must equal the model's tree.
"""

from __future__ import annotations

import contextlib
import io
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from capsa.errors import ImageError
from tests.unit.test_oci import docker_archive

NAMES = ["a", "a/b", "a/b/c", "a/d", "e", "e/f"]
Entry = tuple[
    str, str, str
]  # (path, kind: "f" file / "d" dir / "l" symlink / "w" whiteout / "o" opaque, data)


OPAQUE = ".wh..wh..opq"
IMPLICIT = "?"  # a parent directory the layer has no entry for (capsa writes none either)


class Fails(Exception):
    """The model's Docker would fail to apply the layer."""


def _drop(tree: dict[str, tuple[str, str]], path: str, *, itself: bool = True) -> None:
    for p in [p for p in tree if p.startswith(path + "/") or (itself and p == path) or not path]:
        del tree[p]


def changeset(layer: list[Entry]) -> tuple[dict[str, tuple[str, str]], list[str], list[str]]:
    entries: dict[str, tuple[str, str]] = {}
    for name, kind, data in layer:  # an opaque marker: an xattr, gone when its directory goes
        path = f"{name}/{OPAQUE}".lstrip("/") if kind == "o" else name
        ancestors = [path.rsplit("/", n)[0] for n in range(1, path.count("/") + 1)]
        if any(a in entries and entries[a][0] != "d" for a in ancestors):
            raise Fails(path)
        if kind == "w" and path in entries:  # mknod over what the layer has: EEXIST
            raise Fails(path)
        if path in entries and not (entries[path][0] == "d" and kind == "d"):
            _drop(entries, path)
        for parent in ancestors:  # Docker creates missing parents (MkdirAll): IMPLICIT here
            entries.setdefault(parent, ("d", IMPLICIT))
        entries[path] = (kind, data)  # a whiteout: a device node at its path, until replaced
    whiteouts = [path for path, (kind, _) in entries.items() if kind == "w"]
    opaque = [
        path.removesuffix(OPAQUE).rstrip("/") for path, (kind, _) in entries.items() if kind == "o"
    ]
    return {p: v for p, v in entries.items() if v[0] not in "wo"}, whiteouts, opaque


def model(layers: list[list[Entry]]) -> dict[str, tuple[str, str]]:
    tree: dict[str, tuple[str, str]] = {}
    for layer in layers:
        entries, whiteouts, opaque = changeset(layer)
        for path in whiteouts:
            _drop(tree, path)
        for path in opaque:
            _drop(tree, path, itself=False)
        for path, (kind, data) in sorted(entries.items()):
            if path in tree and not (tree[path][0] == "d" and kind == "d"):
                _drop(tree, path)
            if data != IMPLICIT or path not in tree:
                tree[path] = (kind, data)
    return {path: value for path, value in tree.items() if value[1] != IMPLICIT}


def layer_bytes(layer: list[Entry]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path, kind, data in layer:
            if kind in "wo":
                folder, _, base = path.rpartition("/")
                name = OPAQUE if kind == "o" else ".wh." + base
                if kind == "o":
                    folder = path
                info = tarfile.TarInfo(f"{folder}/{name}".lstrip("/"))
            else:
                info = tarfile.TarInfo(path)
                info.type = {"f": tarfile.REGTYPE, "d": tarfile.DIRTYPE, "l": tarfile.SYMTYPE}[kind]
                info.mode = 0o755 if kind == "d" else 0o644
                info.mtime = int(data) if kind == "d" else 0  # a directory's metadata: last wins
                info.linkname = data if kind == "l" else ""
                info.size = len(data) if kind == "f" else 0
            tar.addfile(info, io.BytesIO(data.encode()) if info.size else None)
    return buf.getvalue()


@st.composite
def layers(draw: st.DrawFn) -> list[list[Entry]]:
    result = []
    for number in range(draw(st.integers(1, 3))):
        marks = draw(
            st.lists(st.tuples(st.sampled_from(["", *NAMES]), st.sampled_from("wo")), max_size=2)
        )
        layer: list[Entry] = []
        seen: set[str] = set()

        def parents(path: str, layer: list[Entry], seen: set[str], base: int, more: int = 0) -> None:
            parts = path.split("/") if path else []
            for depth in range(1, len(parts) + more):  # a layer has its entries' parents
                parent = "/".join(parts[:depth])
                if parent not in seen:
                    seen.add(parent)
                    layer.append((parent, "d", str(base + len(layer))))

        for path, kind in marks:
            if path or kind == "o":
                parents(path, layer, seen, number * 100, int(kind == "o"))
                layer.append((path, kind, ""))
        for index in range(draw(st.integers(0, 6))):
            path = draw(st.sampled_from(NAMES))
            kind = draw(st.sampled_from("fdl"))
            parents(path, layer, seen, number * 100)
            seen.add(path)
            data = {"f": f"L{number}E{index}", "d": str(number * 100 + index), "l": f"/t{index}"}[kind]
            layer.append((path, kind, data))
        result.append(layer)
    return result


def merged(tmp_path: Path, stack: list[list[Entry]]) -> dict[str, tuple[str, str]]:
    from capsa.image.layers import merge_layers, plan_layers
    from capsa.image.mergetree import Repeated
    from capsa.image.oci import open_image

    archive_path = docker_archive(tmp_path / "img.tar", [layer_bytes(layer) for layer in stack])
    buf = io.BytesIO()
    archive, manifest = open_image(archive_path)
    with archive:
        try:
            with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as out:
                merge_layers(archive, manifest.layers, out)
        except Repeated:
            plan = plan_layers(archive, manifest.layers)
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as out:
                merge_layers(archive, manifest.layers, out, "", plan)
    tree: dict[str, tuple[str, str]] = {}
    buf.seek(0)
    with tarfile.open(fileobj=buf) as tar:
        for m in tar:
            assert m.name not in tree, f"{m.name} written twice"
            if m.isdir():
                tree[m.name] = ("d", str(m.mtime))
            elif m.issym():
                tree[m.name] = ("l", m.linkname)
            else:
                tree[m.name] = ("f", tar.extractfile(m).read().decode())  # type: ignore[union-attr]
    return tree


@example(  # a directory's opaque marker goes with the directory (RemoveAll): the lower e/f shows
    stack=[
        [],
        [("e", "d", "100"), ("e/f", "f", "L1E0")],
        [
            ("e", "d", "200"),
            ("e/f", "d", "201"),
            ("e/f", "o", ""),
            ("e", "f", "L2E0"),
            ("e", "d", "201"),
        ],
    ]
)
@example(  # so does a whiteout below it (a device node in the diff directory)
    stack=[
        [("e", "d", "0"), ("e/f", "f", "L0E0")],
        [("e", "d", "100"), ("e/f", "w", ""), ("e", "f", "L1E0"), ("e", "d", "101")],
    ]
)
@example(  # and a whiteout's device node goes when a later entry replaces it: a/b shows
    stack=[[("a", "d", "0"), ("a/b", "f", "L0E0")], [("a", "w", ""), ("a", "d", "100")]]
)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stack=layers())
def test_merge_matches_docker(tmp_path: Path, stack: list[list[Entry]]) -> None:
    try:
        expected = model(stack)
    except Fails:  # capsa refuses it too, unless an upper layer hides the failing entries
        with contextlib.suppress(ImageError):
            merged(tmp_path, stack)
        return
    assert merged(tmp_path, stack) == expected


@pytest.mark.parametrize(
    ("stack", "expected"),
    [
        ([[("a", "f", "L0E0")], [("a", "f", "L1E0"), ("a", "w", "")]], {"a": ("f", "L1E0")}),
        (
            [
                [("a", "d", "0"), ("a/b", "f", "L0E0")],
                [("a", "d", "100"), ("a/c", "f", "L1E0"), ("a", "w", "")],
            ],
            {"a": ("d", "100"), "a/c": ("f", "L1E0")},
        ),
    ],
)
def test_whiteout_after_an_entry_of_its_layer_keeps_the_entry(
    tmp_path: Path, stack: list[list[Entry]], expected: dict[str, tuple[str, str]]
) -> None:
    """Docker's overlay2 fails there (mknod: EEXIST), the model too; capsa follows the OCI image
    spec (whiteouts hide the lower layers only), as docs/images.md says."""
    with pytest.raises(Fails):
        model(stack)
    assert merged(tmp_path, stack) == expected
