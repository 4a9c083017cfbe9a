"""OCI / Docker image import: layer merge with whiteouts, digests, hostile layers (no VM).

The tests write their own archives (a busybox-only image from the host's /bin/busybox) in each
format, import them with ``capsa.Image.from_oci`` and read the resulting SquashFS back with
``sqfs2tar``, an independent reader, to compare the merged tree entry by entry.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from capsa import Image
from capsa.errors import ImageError

BUSYBOX = Path("/bin/busybox")
pytestmark = pytest.mark.skipif(
    shutil.which("tar2sqfs") is None or shutil.which("sqfs2tar") is None,
    reason="needs squashfs-tools-ng",
)


@dataclass
class E:
    """A layer entry: a file (data), dir, symlink/hardlink (link), or other tar type."""

    name: str
    data: bytes | None = None
    type: bytes = tarfile.REGTYPE
    link: str = ""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0


def D(name: str, mode: int = 0o755, uid: int = 0) -> E:
    return E(name, type=tarfile.DIRTYPE, mode=mode, uid=uid)


def layer_tar(entries: list[E]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.type, info.mode, info.uid, info.gid, info.linkname = (
                e.type,
                e.mode,
                e.uid,
                e.gid,
                e.link,
            )
            info.devmajor, info.devminor = (1, 3) if e.type in (tarfile.CHRTYPE,) else (0, 0)
            data = e.data or b""
            info.size = len(data) if e.type == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data) if info.size else None)
    return buf.getvalue()


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


IMAGE_CONFIG = {"Env": ["PATH=/bin", "GREETING=a=b"], "WorkingDir": "/srv", "User": "1000:1000"}


def docker_archive(path: Path, layers: list[bytes], *, diff_ids: list[str] | None = None) -> Path:
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": IMAGE_CONFIG,
            "rootfs": {"type": "layers", "diff_ids": diff_ids or [sha(x) for x in layers]},
        }
    ).encode()
    files = {f"{i:02d}/layer.tar": data for i, data in enumerate(layers)}
    files["config.json"] = config
    names = [f"{i:02d}/layer.tar" for i in range(len(layers))]
    manifest = [{"Config": "config.json", "RepoTags": ["test:1"], "Layers": names}]
    files["manifest.json"] = json.dumps(manifest).encode()
    write_tar(path, files)
    return path


def write_tar(path: Path, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def oci_layout(directory: Path, layers: list[bytes], *, compress: bool = True) -> Path:
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def blob(data: bytes) -> dict[str, object]:
        (blobs / sha(data).removeprefix("sha256:")).write_bytes(data)
        return {"digest": sha(data), "size": len(data)}

    stored = [gzip.compress(x, mtime=0) if compress else x for x in layers]
    config = blob(
        json.dumps({"config": IMAGE_CONFIG, "rootfs": {"diff_ids": [sha(x) for x in layers]}}).encode()
    )
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **blob(x)} for x in stored
        ],
    }
    desc = blob(json.dumps(manifest).encode())
    index = {"schemaVersion": 2, "manifests": [{"mediaType": manifest["mediaType"], **desc}]}
    (directory / "index.json").write_text(json.dumps(index))
    (directory / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return directory


def base_layer() -> bytes:
    return layer_tar(
        [
            D("bin"),
            E("bin/busybox", BUSYBOX.read_bytes(), mode=0o755),
            E("bin/sh", type=tarfile.SYMTYPE, link="busybox", mode=0o777),
            E("bin/cat", type=tarfile.SYMTYPE, link="/bin/busybox", mode=0o777),
            E("bin/ls", type=tarfile.LNKTYPE, link="bin/busybox"),
            D("etc"),
            E("etc/os-release", b'ID=capsatest\nPRETTY_NAME="capsa test image"\n'),
            E("etc/gone", b"whited out\n"),
            E("etc/abs-link", type=tarfile.SYMTYPE, link="/etc/os-release", mode=0o777),
            D("opt"),
            E("opt/old", b"hidden by the opaque dir\n"),
            D("opt/olddir"),
            E("opt/olddir/deep", b"hidden too\n"),
            D("usr/sbin"),
            E("usr/sbin/su", b"#!/bin/sh\n", mode=0o4755),
            D("home/user", mode=0o700, uid=1000),
            E("home/user/.profile", b"x\n", uid=1000, gid=1000, mode=0o600),
            D("var/thing"),
            E("var/thing/inside", b"replaced by a file above\n"),
        ]
    )


def top_layer() -> bytes:
    return layer_tar(
        [
            E("etc/.wh.gone"),
            E("opt/.wh..wh..opq"),
            E("opt/new", b"new\n"),
            E("var/thing", b"now a file\n"),
            E("etc/os-release", b'ID=capsatest\nPRETTY_NAME="capsa test image v2"\n'),
            D("srv"),
            E("etc/passwd", b"root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/home/user:/bin/sh\n"),
            E("etc/group", b"root:x:0:\napp:x:1000:\nstaff:x:50:\n"),
        ]
    )


EXPECTED = {
    # name: (type, mode, uid, gid, link or data)
    "bin": ("d", 0o755, 0, 0, None),
    "bin/busybox": ("f", 0o755, 0, 0, "busybox"),
    "bin/sh": ("l", None, 0, 0, "busybox"),
    "bin/cat": ("l", None, 0, 0, "/bin/busybox"),
    "bin/ls": ("h", 0o755, 0, 0, "bin/busybox"),
    "etc": ("d", 0o755, 0, 0, None),
    "etc/os-release": ("f", 0o644, 0, 0, b'ID=capsatest\nPRETTY_NAME="capsa test image v2"\n'),
    "etc/abs-link": ("l", None, 0, 0, "/etc/os-release"),
    "opt": ("d", 0o755, 0, 0, None),
    "opt/new": ("f", 0o644, 0, 0, b"new\n"),
    "usr": ("d", 0o755, 0, 0, None),
    "usr/sbin": ("d", 0o755, 0, 0, None),
    "usr/sbin/su": ("f", 0o4755, 0, 0, b"#!/bin/sh\n"),
    "home": ("d", 0o755, 0, 0, None),
    "home/user": ("d", 0o700, 1000, 0, None),
    "home/user/.profile": ("f", 0o600, 1000, 1000, b"x\n"),
    "var": ("d", 0o755, 0, 0, None),
    "var/thing": ("f", 0o644, 0, 0, b"now a file\n"),
    "srv": ("d", 0o755, 0, 0, None),
    "etc/passwd": (
        "f",
        0o644,
        0,
        0,
        b"root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/home/user:/bin/sh\n",
    ),
    "etc/group": ("f", 0o644, 0, 0, b"root:x:0:\napp:x:1000:\nstaff:x:50:\n"),
}


def read_tree(sqfs: Path) -> dict[str, tuple[str, int | None, int, int, object]]:
    """The squashfs' tree, read back by sqfs2tar (independent of capsa's writer)."""
    data = subprocess.run(["sqfs2tar", str(sqfs)], capture_output=True, check=True, timeout=60)
    tree: dict[str, tuple[str, int | None, int, int, object]] = {}
    with tarfile.open(fileobj=io.BytesIO(data.stdout)) as tar:
        for m in tar:
            name = m.name.strip("/")
            if name == "capsa-image.json":
                continue
            assert name.startswith("rootfs"), name
            name = name.removeprefix("rootfs").strip("/")
            if not name:
                continue
            m.linkname = m.linkname.removeprefix("rootfs/") if m.islnk() else m.linkname
            if m.isdir():
                tree[name] = ("d", m.mode, m.uid, m.gid, None)
            elif m.issym():
                tree[name] = ("l", None, m.uid, m.gid, m.linkname)
            elif m.islnk():
                tree[name] = ("h", m.mode, m.uid, m.gid, m.linkname)
            else:
                body = tar.extractfile(m)
                assert body is not None
                content = body.read()
                value: object = "busybox" if content == BUSYBOX.read_bytes() else content
                tree[name] = ("f", m.mode, m.uid, m.gid, value)
    return tree


def hard_link_pair_ok(tree: dict[str, tuple[str, int | None, int, int, object]]) -> bool:
    # sqfs2tar may emit either name of a hard-linked pair as the file and the other as the link.
    pair = {tree["bin/busybox"][0], tree["bin/ls"][0]}
    return pair == {"f", "h"}


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("CAPSA_CACHE_DIR", str(tmp_path / "cache"))
    yield


def check_tree(sqfs: Path) -> None:
    tree = read_tree(sqfs)
    assert hard_link_pair_ok(tree)
    for name in ("bin/busybox", "bin/ls"):
        tree.pop(name)
    expected = dict(EXPECTED)
    for name in ("bin/busybox", "bin/ls"):
        expected.pop(name)
    assert tree == expected


def test_docker_archive_merges_layers_exactly(tmp_path: Path) -> None:
    archive = docker_archive(tmp_path / "img.tar", [base_layer(), top_layer()])
    built = Image.from_oci(archive).build()
    assert len(built.layers) == 1
    check_tree(built.layers[0])
    assert built.config.env == (("PATH", "/bin"), ("GREETING", "a=b"))
    assert (built.config.workdir, built.config.user) == ("/srv", "1000:1000")


def test_oci_layout_directory_and_tar(tmp_path: Path) -> None:
    layout = oci_layout(tmp_path / "layout", [base_layer(), top_layer()])
    built = Image.from_oci(layout).build()
    check_tree(built.layers[0])
    packed = tmp_path / "layout.tar"
    with tarfile.open(packed, "w") as tar:
        tar.add(layout, arcname=".")
    (tmp_path / "cache").rename(tmp_path / "cache-before")  # force a second import
    again = Image.from_oci(packed, name="layout").build()
    check_tree(again.layers[0])
    assert again.key == built.key  # same content, same cache key


def test_second_build_comes_from_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = docker_archive(tmp_path / "img.tar", [base_layer()])
    first = Image.from_oci(archive).build()

    def no_squash(*_: object) -> None:
        raise AssertionError("rebuilt a cached image")

    monkeypatch.setattr("capsa.image.custom.import_layers", no_squash)
    assert Image.from_oci(archive).build() == first


def test_layer_digest_mismatch_is_refused(tmp_path: Path) -> None:
    layers = [base_layer(), top_layer()]
    archive = docker_archive(tmp_path / "img.tar", layers, diff_ids=[sha(layers[0]), sha(b"x")])
    with pytest.raises(ImageError, match="does not match its digest"):
        Image.from_oci(archive).build()
    assert not list((tmp_path / "cache").rglob("*.sqfs"))  # nothing half-built is kept


def test_tampered_oci_blob_is_refused(tmp_path: Path) -> None:
    layout = oci_layout(tmp_path / "layout", [base_layer()], compress=False)
    blobs = sorted((layout / "blobs" / "sha256").iterdir(), key=lambda p: p.stat().st_size)
    biggest = blobs[-1]  # the layer
    data = bytearray(biggest.read_bytes())
    data[700] ^= 1
    biggest.write_bytes(bytes(data))
    with pytest.raises(ImageError, match="digest"):
        Image.from_oci(layout).build()


@pytest.mark.parametrize("content", [None, b"", b"\x00junk" * 300], ids=["missing", "empty", "junk"])
def test_not_an_image(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "image.tar"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ImageError):
        Image.from_oci(path).build()


def test_tar_that_is_not_an_image(tmp_path: Path) -> None:
    write_tar(tmp_path / "plain.tar", {"hello.txt": b"hi"})
    with pytest.raises(ImageError, match="not a container image"):
        Image.from_oci(tmp_path / "plain.tar").build()


def test_manifest_naming_a_missing_layer(tmp_path: Path) -> None:
    archive = docker_archive(tmp_path / "img.tar", [base_layer()])
    with tarfile.open(archive) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}  # type: ignore[union-attr]
    del files["00/layer.tar"]
    write_tar(tmp_path / "broken.tar", files)
    with pytest.raises(ImageError, match="no file"):
        Image.from_oci(tmp_path / "broken.tar").build()


def test_manifest_naming_a_path_outside(tmp_path: Path) -> None:
    """Attack: a manifest whose layer path is ``../secret`` reads a host file next to the layout."""
    (tmp_path / "secret").write_bytes(base_layer())
    layout = oci_layout(tmp_path / "layout", [base_layer()])
    docker = {
        "manifest.json": json.dumps([{"Config": "c.json", "Layers": ["../secret"]}]).encode(),
        "c.json": json.dumps(
            {"rootfs": {"diff_ids": [sha((tmp_path / "secret").read_bytes())]}}
        ).encode(),
    }
    for name, data in docker.items():
        (layout / name).write_bytes(data)
    with pytest.raises(ImageError, match="outside"):
        Image.from_oci(layout).build()


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        (E("../escape", b"x"), "escapes"),
        (E("etc/../../escape", b"x"), "escapes"),
        (E("bin/hl", type=tarfile.LNKTYPE, link="../../etc/passwd"), "escapes"),
    ],
    ids=["dotdot", "nested-dotdot", "hardlink-out"],
)
def test_hostile_layer_entries_are_refused(tmp_path: Path, entry: E, match: str) -> None:
    """Attack: a layer entry or hard link escaping the image root with ``..``."""
    archive = docker_archive(tmp_path / "img.tar", [layer_tar([D("etc"), D("bin"), entry])])
    with pytest.raises(ImageError, match=match):
        Image.from_oci(archive).build()
    assert not (tmp_path / "escape").exists()
    assert not list((tmp_path / "cache").rglob("*.sqfs"))


def test_device_nodes_are_dropped_and_absolute_names_stay_inside(tmp_path: Path) -> None:
    """Attack: a device node (``/dev/mem``-like) and absolute entry names in a layer."""
    layer = layer_tar(
        [
            E("dev/evil", type=tarfile.CHRTYPE, mode=0o666),
            E("/abs/file", b"inside\n"),
            E("link-out", type=tarfile.SYMTYPE, link="/../../../etc/shadow", mode=0o777),
        ]
    )
    built = Image.from_oci(docker_archive(tmp_path / "img.tar", [layer])).build()
    tree = read_tree(built.layers[0])
    assert "dev/evil" not in tree
    assert tree["abs/file"][4] == b"inside\n"
    assert tree["link-out"] == ("l", None, 0, 0, "/../../../etc/shadow")  # data, resolved in-guest


# -- the layer tar reader and writer (capsa.image.tarstream), against Python's tarfile ------------


def _merged(layers: list[bytes], tmp_path: Path) -> dict[str, tarfile.TarInfo | bytes]:
    """Merge ``layers`` into an in-memory tar with merge_layers and read it back with tarfile."""
    from capsa.image.layers import merge_layers
    from capsa.image.oci import open_image

    archive, manifest = open_image(docker_archive(tmp_path / "img.tar", layers))
    buf = io.BytesIO()
    with archive, tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as out:
        merge_layers(archive, manifest.layers, out, "rootfs/")
    result: dict[str, tarfile.TarInfo | bytes] = {}
    buf.seek(0)
    with tarfile.open(fileobj=buf) as tar:
        for member in tar:
            result[member.name] = member
            if member.isreg():
                result[member.name + ":data"] = tar.extractfile(member).read()  # type: ignore[union-attr]
    return result


@pytest.mark.parametrize(
    "fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT], ids=["pax", "gnu", "ustar"]
)
def test_long_names_big_ids_and_xattrs_survive_each_tar_format(tmp_path: Path, fmt: int) -> None:
    deep = "d" * 90 + "/" + "e" * 50 + "/" + "f" * 60  # > 100 bytes: prefix, PAX or GNU longname
    ustar = fmt == tarfile.USTAR_FORMAT  # no large uids, no long link targets
    long_target = "/" + "t" * 150
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        big = tarfile.TarInfo(deep)
        big.size, big.uid, big.gid, big.mode, big.mtime = 3, 7 if ustar else 2_000_000, 42, 0o4711, 1
        if fmt == tarfile.PAX_FORMAT:
            big.pax_headers = {"SCHILY.xattr.user.note": "hello", "comment": "dropped"}
        tar.addfile(big, io.BytesIO(b"abc"))
        link = tarfile.TarInfo("sym")
        link.type, link.linkname = tarfile.SYMTYPE, "/short" if ustar else long_target
        tar.addfile(link)
        for name in ("ünïcode-name", "dir-no-type/"):
            info = tarfile.TarInfo(name)
            info.type = tarfile.AREGTYPE
            tar.addfile(info)
    merged = _merged([buf.getvalue()], tmp_path)
    member = merged["rootfs/" + deep]
    assert isinstance(member, tarfile.TarInfo)
    assert (member.size, member.mode, member.gid, member.mtime) == (3, 0o4711, 42, 1)
    assert member.uid == (7 if ustar else 2_000_000)
    assert merged["rootfs/" + deep + ":data"] == b"abc"
    if fmt == tarfile.PAX_FORMAT:
        assert member.pax_headers.get("SCHILY.xattr.user.note") == "hello"
        assert "comment" not in member.pax_headers
    sym = merged["rootfs/sym"]
    assert isinstance(sym, tarfile.TarInfo) and sym.linkname == ("/short" if ustar else long_target)
    assert isinstance(merged["rootfs/dir-no-type"], tarfile.TarInfo)
    assert merged["rootfs/dir-no-type"].isdir()
    assert "rootfs/ünïcode-name" in merged


def test_compressed_layers_multi_member_gzip_and_xz(tmp_path: Path) -> None:
    import lzma

    top, base = top_layer(), base_layer()
    half = len(base) // 2
    two_members = gzip.compress(base[:half], mtime=0) + gzip.compress(base[half:], mtime=0) + bytes(9)
    layout = oci_layout(tmp_path / "layout", [base, top], compress=False)
    blobs = layout / "blobs" / "sha256"
    index = json.loads((layout / "index.json").read_text())
    manifest_path = blobs / index["manifests"][0]["digest"].removeprefix("sha256:")
    manifest = json.loads(manifest_path.read_text())
    for entry, data in zip(manifest["layers"], [two_members, lzma.compress(top)], strict=True):
        (blobs / sha(data).removeprefix("sha256:")).write_bytes(data)
        entry["digest"], entry["size"] = sha(data), len(data)
    data = json.dumps(manifest).encode()
    (blobs / sha(data).removeprefix("sha256:")).write_bytes(data)
    index["manifests"][0].update(digest=sha(data), size=len(data))
    (layout / "index.json").write_text(json.dumps(index))
    check_tree(Image.from_oci(layout).build().layers[0])


@pytest.mark.parametrize(
    "cut", [10, 512 + 100, 1024 + 2000], ids=["mid-header", "mid-second-header", "mid-data"]
)
def test_truncated_layer_is_refused(tmp_path: Path, cut: int) -> None:
    layer = layer_tar([D("etc"), E("etc/big", b"x" * 4000)])
    short = layer[:cut]
    archive = docker_archive(tmp_path / "img.tar", [short])
    with pytest.raises(ImageError, match=r"not a readable tar|unexpected end"):
        Image.from_oci(archive).build()
    assert not list((tmp_path / "cache").rglob("*.sqfs"))


def test_corrupt_gzip_layer_is_refused(tmp_path: Path) -> None:
    layout = oci_layout(tmp_path / "layout", [base_layer()])
    blobs = sorted((layout / "blobs" / "sha256").iterdir(), key=lambda p: p.stat().st_size)
    data = bytearray(blobs[-1].read_bytes())
    data[len(data) // 2] ^= 0xFF
    blobs[-1].write_bytes(bytes(data))
    with pytest.raises(ImageError, match=r"digest|not a readable tar"):
        Image.from_oci(layout).build()


def _raw_layer(headers: list[tuple[tarfile.TarInfo, bytes]], fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for info, data in headers:
            tar.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT], ids=["pax", "gnu"])
def test_long_hostile_names_are_refused(tmp_path: Path, fmt: int) -> None:
    """Attack: ``..`` hidden in a name only a PAX ``path`` record or a GNU longname carries (the
    ustar name field holds a harmless truncation)."""
    info = tarfile.TarInfo("a/" * 60 + "../" * 70 + "escape")
    info.size = 1
    archive = docker_archive(tmp_path / "img.tar", [_raw_layer([(info, b"x")], fmt)])
    with pytest.raises(ImageError, match="escapes"):
        Image.from_oci(archive).build()
    link = tarfile.TarInfo("hl")
    link.type, link.linkname = tarfile.LNKTYPE, "b/" * 60 + "../" * 70 + "etc/passwd"
    archive = docker_archive(tmp_path / "img2.tar", [_raw_layer([(link, b"")], fmt)])
    with pytest.raises(ImageError, match="escapes"):
        Image.from_oci(archive).build()


def test_huge_extended_header_is_refused(tmp_path: Path) -> None:
    """Attack: a PAX header claiming gigabytes of records, to make the importer hold them in memory."""
    from capsa.image.tarstream import BLOCK, _ustar

    header = _ustar(b"././@PaxHeader", b"x", size=4 << 30)
    layer = header + bytes(BLOCK * 4)
    archive = docker_archive(tmp_path / "img.tar", [layer])
    with pytest.raises(ImageError, match="extended header"):
        Image.from_oci(archive).build()


# -- Docker's reading of odd layers (see docs/images.md: "What capsa makes of a layer") -----------


def _pax_entry(pairs: tuple[tuple[str, bytes], ...], name: bytes, data: bytes = b"") -> bytes:
    from capsa.image.tarstream import BLOCK, _record, _ustar, padding

    records = b"".join(_record(key, value) for key, value in pairs)
    return (
        _ustar(b"././@PaxHeader", b"x", size=len(records)) + records + bytes(-len(records) % BLOCK)
        + _ustar(name, b"0", size=len(data)) + data + padding(len(data))
    )  # fmt: skip


def test_one_zero_block_then_the_end_is_a_clean_end(tmp_path: Path) -> None:
    from capsa.image.tarstream import BLOCK

    layer = layer_tar([E("f", b"x")])
    end = layer.rindex(b"x") + BLOCK  # just after f's data block
    tree = read_tree(
        Image.from_oci(docker_archive(tmp_path / "img.tar", [layer[:end] + bytes(BLOCK)]))
        .build()
        .layers[0]
    )
    assert tree["f"][4] == b"x"


@pytest.mark.parametrize(
    ("records", "match"),
    [
        ((("size", b"9" * 19),), "over 64 bits"),
        ((("size", b"9" * 21),), "invalid PAX value"),
        ((("size", b"-5"),), "negative size"),
    ],
    ids=["size-over-int64", "size-too-many-digits", "size-negative"],
)
def test_bad_sizes_are_refused(
    tmp_path: Path, records: tuple[tuple[str, bytes], ...], match: str
) -> None:
    layer = _pax_entry(records, b"f", b"x") + bytes(1024)
    with pytest.raises(ImageError, match=match):
        Image.from_oci(docker_archive(tmp_path / "img.tar", [layer])).build()


def test_unstorable_xattrs_are_dropped_and_empty_pax_values_unset(tmp_path: Path) -> None:
    """squashfs stores user/trusted/security attributes only: an ACL is dropped (Docker ignores what
    its filesystem refuses), not a failed import; an empty PAX value removes the record (Go)."""
    records = (("SCHILY.xattr.system.posix_acl_access", b"\x02\0\0\0"), ("path", b""))
    layer = _pax_entry(records, b"f", b"x") + bytes(1024)
    tree = read_tree(Image.from_oci(docker_archive(tmp_path / "img.tar", [layer])).build().layers[0])
    assert tree["f"][4] == b"x"


def test_aufs_metadata_is_skipped_and_a_file_cannot_be_a_parent(tmp_path: Path) -> None:
    layer = layer_tar([E(".wh..wh.plnk/123.456", b"aufs"), D(".wh..wh.orph"), E("f", b"x")])
    tree = read_tree(Image.from_oci(docker_archive(tmp_path / "img.tar", [layer])).build().layers[0])
    assert list(tree) == ["f"]
    bad = layer_tar([E("a", b"file"), E("a/b", b"below a file")])  # Docker: ENOTDIR
    with pytest.raises(ImageError, match="not a directory"):
        Image.from_oci(docker_archive(tmp_path / "bad.tar", [bad])).build()


def test_lower_file_under_an_upper_directory_is_hidden(tmp_path: Path) -> None:
    """The upper layer has ``a/b`` (so ``a`` is its directory), the lower one a file ``a``: the
    directory wins, as in overlayfs (tar2sqfs refused the file over the directory before)."""
    lower = layer_tar([E("a", b"lower file")])
    upper = layer_tar([E("a/b", b"upper")])
    tree = read_tree(
        Image.from_oci(docker_archive(tmp_path / "img.tar", [lower, upper])).build().layers[0]
    )
    assert tree["a/b"][4] == b"upper" and tree["a"][0] == "d"


def test_opaque_marker_alone_makes_its_directory_hide_a_lower_file(tmp_path: Path) -> None:
    """``d/.wh..wh..opq`` without a ``d`` entry: the layer still has ``d`` as a directory (Docker
    creates it), so a lower file ``d`` is hidden, not shown under it."""
    lower = layer_tar([E("d", b"lower file"), E("kept", b"k")])
    upper = layer_tar([E("d/.wh..wh..opq")])
    tree = read_tree(
        Image.from_oci(docker_archive(tmp_path / "img.tar", [lower, upper])).build().layers[0]
    )
    assert "d" not in tree and tree["kept"][4] == b"k"
