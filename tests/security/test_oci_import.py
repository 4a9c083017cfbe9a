"""Attacks on the OCI / Docker image importer: hostile archives, layers and manifests (no VM).

A hostile image may be handed to ``Image.from_oci`` by anyone who can name an image: it must never
crash the importer with a traceback, make it take memory or time out of proportion to its size,
nor mean something other than what Docker makes of it. Every archive here is written by hand
(tar headers built byte by byte, so that the importer's own writer is not the judge) and imported
with ``capsa.Image.from_oci``; the SquashFS is read back with ``sqfs2tar``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from capsa import Image
from capsa.errors import ImageError
from tests.unit.test_oci import D, E, docker_archive, layer_tar, oci_layout, read_tree, sha, write_tar

pytestmark = pytest.mark.skipif(
    shutil.which("tar2sqfs") is None or shutil.which("sqfs2tar") is None,
    reason="needs squashfs-tools-ng",
)

BLOCK = 512
END = bytes(2 * BLOCK)


def ustar(name: bytes, kind: bytes = b"0", size: int = 0, *, link: bytes = b"", uid: int = 0,
          mtime: int = 0, raw: dict[str, bytes] | None = None) -> bytes:  # fmt: skip
    """One ustar header block; ``raw`` overrides fields with bytes as given (size, uid, mtime...)."""
    fields = {
        "name": name.ljust(100, b"\0"), "mode": b"%07o\0" % 0o755, "uid": b"%07o\0" % uid,
        "gid": b"0000000\0", "size": b"%011o\0" % size, "mtime": b"%011o\0" % mtime,
        "chksum": b" " * 8, "type": kind, "link": link.ljust(100, b"\0"), "magic": b"ustar\x0000",
        "rest": bytes(BLOCK - 265),
    }  # fmt: skip
    fields.update(raw or {})
    block = b"".join(fields.values())
    assert len(block) == BLOCK, len(block)
    return block[:148] + b"%06o\0 " % sum(block) + block[156:]


def record(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length = len(str(length)) + len(body)
    return str(length).encode() + body


def pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % BLOCK)


def pax(records: list[tuple[bytes, bytes]], kind: bytes = b"x") -> bytes:
    data = b"".join(record(k, v) for k, v in records)
    return ustar(b"././@PaxHeader", kind, len(data)) + pad(data)


def entry(name: bytes, data: bytes = b"", kind: bytes = b"0", **kw: object) -> bytes:
    size = len(data) if kind == b"0" else 0
    return ustar(name, kind, size, **kw) + pad(data)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("CAPSA_CACHE_DIR", str(tmp_path / "cache"))
    yield


def build(tmp_path: Path, *layers: bytes) -> dict[str, tuple[str, int | None, int, int, object]]:
    archive = docker_archive(tmp_path / "img.tar", list(layers))
    return read_tree(Image.from_oci(archive).build().layers[0])


def refused(tmp_path: Path, *layers: bytes, match: str) -> ImageError:
    with pytest.raises(ImageError, match=match) as info:
        Image.from_oci(docker_archive(tmp_path / "img.tar", list(layers))).build()
    assert not list((tmp_path / "cache").rglob("*.sqfs"))
    return info.value


# -- memory and time ------------------------------------------------------------------------------

_CHILD = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
from capsa import Image
from capsa.errors import ImageError
try:
    Image.from_oci(sys.argv[1]).build()
    print("built")
except ImageError as exc:
    print("ImageError", str(exc).replace("\\n", " ")[:200])
except MemoryError:
    print("MemoryError")
# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across execve, so a child of a large pytest process
# would report its parent's size
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(int(hwm.split()[1]) // 1024)
"""


@pytest.mark.timeout(300)
def test_megabyte_deep_pax_path_is_refused_in_bounded_memory(tmp_path: Path) -> None:
    """Attack: a 1 MiB PAX ``path`` of ``d/d/d/...`` (524k levels): the merge looked every ancestor
    up as a string, quadratic in the depth (245 MiB at 16k levels, out of memory at 400k). Run in a
    child process under a 3 GiB address-space limit; it must be refused, in little memory."""
    path = b"d/" * ((1 << 20) // 2 - 16) + b"f"
    layer = pax([(b"path", path)]) + entry(b"f", b"x") + END
    archive = docker_archive(tmp_path / "img.tar", [layer])
    env = {**os.environ, "CAPSA_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", _CHILD, str(archive)], capture_output=True,
                          text=True, timeout=280, env=env, check=False)  # fmt: skip
    lines = done.stdout.split("\n")
    assert lines[0].startswith("ImageError") and "PATH_MAX" in lines[0], done.stdout + done.stderr
    assert int(lines[1]) < 200, f"peak RSS {lines[1]} MiB"


def test_deep_pax_path_is_refused(tmp_path: Path) -> None:
    """Attack: a 32 KiB PAX path 16k levels deep (245 MiB of merge state before): longer than any
    path the kernel (PATH_MAX) or Docker could create, refused before it costs anything."""
    layer = pax([(b"path", b"d/" * 16000 + b"f")]) + entry(b"f", b"x") + END
    refused(tmp_path, layer, match="PATH_MAX")


def test_long_path_component_is_refused(tmp_path: Path) -> None:
    """Attack: a 300-byte file name (NAME_MAX is 255): no filesystem takes it, so no image has it."""
    layer = pax([(b"path", b"dir/" + b"n" * 300)]) + entry(b"f", b"x") + END
    refused(tmp_path, layer, match="over 255 bytes")


def test_deepest_legal_paths_merge_in_linear_memory(tmp_path: Path) -> None:
    """Attack: many entries at the deepest legal path (4095 bytes, 2047 levels): the ancestor
    strings the merge built per entry cost depth x length (4 MiB each); a tree costs the length."""
    import tracemalloc

    from capsa.image.layers import merge_layers
    from capsa.image.oci import open_image

    deep = b"d/" * 2040
    layer = b"".join(pax([(b"path", deep + b"f%d" % i)]) + entry(b"f", b"x") for i in range(20))
    archive, manifest = open_image(docker_archive(tmp_path / "img.tar", [layer + END]))
    sink = io.BytesIO()
    tracemalloc.start()
    try:
        with archive, tarfile.open(fileobj=sink, mode="w", format=tarfile.PAX_FORMAT) as out:
            merge_layers(archive, manifest.layers, out, "rootfs/")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sink.getvalue().count(b"f19") >= 1
    assert peak < 2 << 20, f"merging 20 deep paths took {peak / (1 << 20):.1f} MiB"


@pytest.mark.timeout(200)
def test_outer_archive_pax_header_is_parsed_in_linear_time(tmp_path: Path) -> None:
    """Attack: the outer archive (``docker save`` tar) carries a PAX header of 150 KB of digits;
    Python's tarfile before 3.11.10 parses it in quadratic time (CVE-2024-6232: ~50 s here)."""
    payload = b"9" * 150_000
    archive = tmp_path / "img.tar"
    archive.write_bytes(ustar(b"././@PaxHeader", b"x", len(payload)) + pad(payload) + END)
    started = time.monotonic()
    with pytest.raises(ImageError, match="PAX"):
        Image.from_oci(archive).build()
    assert time.monotonic() - started < 5


def test_outer_archive_entry_count_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Attack: an outer archive of millions of empty entries, each kept in memory while indexing."""
    monkeypatch.setattr("capsa.image.oci.MAX_ARCHIVE_MEMBERS", 50)
    write_tar(tmp_path / "many.tar", {f"f{i}": b"" for i in range(60)})
    with pytest.raises(ImageError, match="over 50 entries"):
        Image.from_oci(tmp_path / "many.tar").build()


@pytest.mark.parametrize("hidden", [False, True], ids=["visible", "hidden-by-upper-layer"])
def test_merge_state_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hidden: bool) -> None:
    """Attack: millions of tiny entries (512 bytes each in the layer) to grow the merge's memory,
    visible ones or ones an upper layer hides (still replayed to find repeated paths)."""
    monkeypatch.setattr("capsa.image.mergetree.MAX_NODES", 40)
    many = b"".join(entry(b"d%d/f" % i, b"x") for i in range(30)) + END
    upper = [layer_tar([E(".wh..wh..opq")])] if hidden else []
    refused(tmp_path, many, *upper, match="over 40 paths")


# -- malformed headers: ImageError, never a traceback ---------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [
        (b"mtime", b"inf"),
        (b"mtime", b"-inf"),
        (b"mtime", b"1e999"),
        (b"mtime", b"9" * 30),
        (b"uid", b"4294967296"),
        (b"uid", b"-1"),
        (b"gid", b"1_000"),
    ],
    ids=[
        "mtime-inf",
        "mtime-neg-inf",
        "mtime-1e999",
        "mtime-huge",
        "uid-2^32",
        "uid-negative",
        "gid-underscore",
    ],
)
def test_bad_pax_numbers_are_refused(tmp_path: Path, key: bytes, value: bytes) -> None:
    """Attack: PAX numbers Go's archive/tar refuses: ``inf`` (an OverflowError traceback before),
    out of 64 bits, or a uid that tar2sqfs truncates to 32 bits (2^32 became root, -1 too)."""
    layer = pax([(key, value)]) + entry(b"f", b"x") + END
    refused(tmp_path, layer, match="not a readable tar")


@pytest.mark.parametrize(
    ("field", "raw"),
    [("uid", b"-000001\0"), ("mtime", b"\x80" + b"\xff" * 11)],
    ids=["uid-signed-octal", "mtime-base256-over-64-bits"],
)
def test_bad_header_numbers_are_refused(tmp_path: Path, field: str, raw: bytes) -> None:
    """Attack: header number fields a lax parser reads as negative sizes / ids or giant times."""
    layer = ustar(b"f", b"0", raw={field: raw}) + END
    refused(tmp_path, layer, match="not a readable tar")


def test_non_utf8_xattr_name_is_kept_not_a_traceback(tmp_path: Path) -> None:
    """Attack: an extended attribute named with bytes that are not UTF-8 (a UnicodeEncodeError
    traceback before); attribute names are bytes to the kernel and to Docker: kept as they are."""
    layer = pax([(b"SCHILY.xattr.user.\xff\xfe", b"v")]) + entry(b"f", b"x") + END
    tree = build(tmp_path, layer)
    assert tree["f"][4] == b"x"
    data = subprocess.run(["sqfs2tar", str(next((tmp_path / "cache").rglob("*.sqfs")))],
                          capture_output=True, check=True, timeout=60).stdout  # fmt: skip
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        member = tar.getmember("rootfs/f")
    assert member.pax_headers["SCHILY.xattr.user.\udcff\udcfe"] == "v"


def test_xattr_flood_is_refused_with_the_limit(tmp_path: Path) -> None:
    """Attack: 60 KiB of extended attributes on one file: over what tar2sqfs reads per header
    (it failed with an obscure message); refused naming capsa's limit."""
    layer = pax([(b"SCHILY.xattr.user.big", b"v" * 60_000)]) + entry(b"f", b"x") + END
    refused(tmp_path, layer, match="KiB of extended attributes")


def test_nul_in_pax_path_is_refused(tmp_path: Path) -> None:
    """Attack: ``path=etc/passwd\\0x`` in a PAX header: capsa's merge saw one name, tar2sqfs cut it
    at the NUL and saw another (``etc/passwd``), past the merge's whiteouts and duplicate checks."""
    layer = pax([(b"path", b"f\0hidden")]) + entry(b"g", b"x") + END
    refused(tmp_path, layer, match="NUL")


@pytest.mark.parametrize(
    ("index", "manifest", "config"),
    [
        ([], None, None),
        ({"manifests": {}}, None, None),
        ({"manifests": [{"digest": "sha256:" + "0" * 64}], "x": 1}, None, None),
        (None, {"config": [], "layers": []}, None),
        (None, {"config": None, "layers": []}, None),
        (None, None, {"config": {"Env": 5}}),
        (None, None, {"config": {"WorkingDir": 5}}),
        (None, None, {"config": {"Cmd": "sh -c evil"}}),
    ],
    ids=[
        "index-list",
        "manifests-object",
        "manifest-missing-blob",
        "config-list",
        "config-null",
        "env-int",
        "workdir-int",
        "cmd-string",
    ],
)
def test_malformed_oci_json_is_refused(
    tmp_path: Path, index: object, manifest: dict[str, object] | None, config: object
) -> None:
    """Attack: an OCI layout whose index.json, manifest or config has the wrong JSON types (an
    AttributeError / TypeError traceback before, or a non-string WorkingDir handed to the guest)."""
    layout = oci_layout(tmp_path / "layout", [layer_tar([E("f", b"x")])])
    blobs = layout / "blobs" / "sha256"

    def put(data: object) -> dict[str, object]:
        raw = json.dumps(data).encode()
        (blobs / sha(raw).removeprefix("sha256:")).write_bytes(raw)
        return {"digest": sha(raw), "size": len(raw)}

    current = json.loads((layout / "index.json").read_text())
    if config is not None or manifest is not None:
        name = current["manifests"][0]["digest"].removeprefix("sha256:")
        body = json.loads((blobs / name).read_text())
        if config is not None:
            body["config"] = put(config)
        if manifest is not None:
            body.update(manifest)
        current["manifests"][0].update(put(body))
    (layout / "index.json").write_text(json.dumps(index if index is not None else current))
    with pytest.raises(ImageError) as info:
        Image.from_oci(layout).build()
    assert info.value.hint


@pytest.mark.parametrize(
    "entry_",
    [{"Config": "c.json", "Layers": [], "RepoTags": 5}, {"Config": "c.json", "Layers": [7]}],
    ids=["repotags-int", "layer-name-int"],
)
def test_malformed_docker_manifest_is_refused(tmp_path: Path, entry_: dict[str, object]) -> None:
    """Attack: manifest.json fields of the wrong JSON type (a TypeError traceback, or a layer named
    by a number read as a string)."""
    config = {"rootfs": {"diff_ids": [sha(b"")] * len(entry_["Layers"])}}  # type: ignore[arg-type]
    files = {"manifest.json": json.dumps([entry_]).encode(), "c.json": json.dumps(config).encode()}
    write_tar(tmp_path / "img.tar", files | {"7": b""})
    with pytest.raises(ImageError, match=r"not a list of strings|RepoTags"):
        Image.from_oci(tmp_path / "img.tar").build()


# -- Docker's semantics -----------------------------------------------------------------------------


def test_single_zero_block_does_not_hide_the_rest(tmp_path: Path) -> None:
    """Attack: one zero block in the middle of a layer. capsa stopped reading there (and imported
    half the layer); Go's archive/tar, hence Docker, refuses a zero block followed by a header."""
    layer = entry(b"shown", b"1") + bytes(BLOCK) + entry(b"after", b"2") + END
    refused(tmp_path, layer, match="zero block")


def test_later_duplicate_entry_wins(tmp_path: Path) -> None:
    """Attack: a layer with two entries for one path; capsa kept the first, Docker keeps the last,
    so a reviewed image (``docker run``) and the imported one differ. A directory replaced by a
    file also loses what the layer put in it before (Docker removes it), and a repeated directory
    takes the last one's metadata."""
    layer = (
        entry(b"etc/passwd", b"first") + entry(b"etc/passwd", b"last")
        + entry(b"d", kind=b"5") + entry(b"d/inside", b"gone") + entry(b"d", b"now a file")
        + entry(b"m", kind=b"5") + entry(b"m/kept", b"kept") + entry(b"m", kind=b"5", uid=7)
        + entry(b"s", kind=b"2", link=b"/etc/shadow") + entry(b"s", b"file")
        + END
    )  # fmt: skip
    tree = build(tmp_path, layer)
    assert tree["etc/passwd"][4] == b"last"
    assert tree["d"] == ("f", 0o755, 0, 0, b"now a file") and "d/inside" not in tree
    assert tree["m"][0] == "d" and tree["m"][2] == 7 and tree["m/kept"][4] == b"kept"
    assert tree["s"][0] == "f"


def test_duplicate_in_lower_layer_under_upper_entry(tmp_path: Path) -> None:
    """Attack: the repeated path sits in a lower layer whose copy an upper layer replaces: the upper
    layer still wins over both (and the replanning merge keeps whiteouts and opaque dirs)."""
    lower = entry(b"a", b"1") + entry(b"a", b"2") + entry(b"b", b"lower") + entry(b"c", b"c") + END
    upper = entry(b"a", b"upper") + entry(b".wh.c") + entry(b"e", b"e") + entry(b"e", b"e2") + END
    tree = build(tmp_path, lower, upper)
    assert {k: v[4] for k, v in tree.items()} == {"a": b"upper", "b": b"lower", "e": b"e2"}


def test_root_opaque_whiteout_hides_lower_layers(tmp_path: Path) -> None:
    """Attack: ``.wh..wh..opq`` at the layer root, which Docker honours (the upper layer replaces
    the whole tree) and capsa ignored, keeping every lower file (old secrets, removed binaries)."""
    lower = layer_tar([D("etc"), E("etc/secret", b"s"), E("top", b"old")])
    upper = entry(b".wh..wh..opq") + entry(b"top", b"new") + END
    tree = build(tmp_path, lower, upper)
    assert {k: v[4] for k, v in tree.items()} == {"top": b"new"}


def test_pax_global_header_is_ignored(tmp_path: Path) -> None:
    """Attack: a PAX global header (``g``) with ``path=`` and ``uid=``: capsa applied it to every
    later entry (all renamed to one path, owners changed); Docker ignores global headers."""
    layer = pax([(b"path", b"bin/sh"), (b"uid", b"1000")], b"g") + entry(b"a", b"1") + entry(b"b", b"2")
    tree = build(tmp_path, layer + END)
    assert {k: (v[2], v[4]) for k, v in tree.items()} == {"a": (0, b"1"), "b": (0, b"2")}


# -- fuzzing: mutated archives give ImageError or an image, nothing else ---------------------------

_KEYS = [b"path", b"linkpath", b"size", b"uid", b"gid", b"mtime", b"SCHILY.xattr.user.a",
         b"SCHILY.xattr.\xff", b"SCHILY.xattr.", b"GNU.sparse.size", b"x"]  # fmt: skip
_VALUES = [b"", b"0", b"-1", b"inf", b"nan", b"1e999", b"9" * 25, b"1.5", b" 1", b"a\0b", b"\xff",
           b"../x", b"/", b"d/" * 3000, b"." * 300, b"4294967295"]  # fmt: skip
_WIDTHS = {"size": 12, "uid": 8, "mtime": 12, "mode": 8, "type": 1}
_RAW = [b"\xff" * 12, b"\x80" + b"\x7f" * 11, b"-1", b"1_0", b"99999999999", b"x", b"\0", b"g", b"L"]


@st.composite
def _layers(draw: st.DrawFn) -> bytes:
    parts = []
    for _ in range(draw(st.integers(1, 4))):
        records = draw(st.lists(st.tuples(st.sampled_from(_KEYS), st.sampled_from(_VALUES)), max_size=3))
        if records:
            parts.append(pax(records, draw(st.sampled_from([b"x", b"g"]))))
        fields = draw(st.dictionaries(st.sampled_from(list(_WIDTHS)), st.sampled_from(_RAW), max_size=2))
        raw = {k: v.ljust(_WIDTHS[k], b"\0")[: _WIDTHS[k]] for k, v in fields.items()}
        kind = draw(st.sampled_from([b"0", b"5", b"2", b"1", b"3"]))
        name = draw(st.sampled_from([b"a", b"a/b", b".wh.a", b".wh..wh..opq", b"./", b"a/.wh..wh..opq"]))
        block = ustar(name, kind, 3 if kind == b"0" else 0, link=b"a", raw=raw)
        parts.append(block + (pad(b"abc") if kind == b"0" else b""))
    tail = draw(st.sampled_from([END, b"", bytes(BLOCK), bytes(BLOCK) + entry(b"z")]))
    return b"".join(parts) + tail


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lower=_layers(), upper=_layers())
def test_fuzzed_layers_give_image_error_or_an_image(tmp_path: Path, lower: bytes, upper: bytes) -> None:
    """Attack: layers built from hostile header fields and PAX records (numbers Go refuses, NULs,
    undecodable bytes, global headers, zero blocks...): only ImageError or an image may come out."""
    from capsa.image.layers import merge_layers
    from capsa.image.oci import open_image

    path = tmp_path / f"fuzz-{sha(lower + upper)[7:19]}.tar"
    docker_archive(path, [lower, upper])

    def merge(plan: object = None) -> None:
        archive, manifest = open_image(path)
        with archive, tarfile.open(fileobj=io.BytesIO(), mode="w", format=tarfile.PAX_FORMAT) as out:
            merge_layers(archive, manifest.layers, out, "rootfs/", *([plan] if plan else []))

    try:
        merge()
    except ImageError as exc:
        if type(exc).__name__ == "Repeated":  # a layer repeats a path: the planned merge
            from capsa.image.layers import plan_layers
            from capsa.image.oci import open_image as again

            with contextlib.suppress(ImageError):
                archive, manifest = again(path)
                with archive:
                    plan = plan_layers(archive, manifest.layers)
                merge(plan)
    finally:
        path.unlink(missing_ok=True)
