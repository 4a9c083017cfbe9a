"""Merge container image layers into one tar stream and squash it, without unpacking anything.

Layers are read top (newest) first, so each path is decided once: the first layer that has it wins,
a whiteout ``.wh.<name>`` hides ``<name>`` (and all below it) in the layers under it, and an opaque
marker ``.wh..wh..opq`` hides everything the lower layers have inside its directory. A non-directory
in an upper layer also hides what lower layers have below that path. The winning entries stream, in
the order they are read, into ``tar2sqfs`` (which accepts children before parents and hard links
before their targets), keeping modes, set-uid bits, ownership and extended attributes.

Hostile entries: a name or hard-link target with ``..`` (or nothing left after normalising) raises
:class:`ImageError`; device nodes are dropped (the guest's ``/dev`` is devtmpfs); symlinks are kept
verbatim, since they are data inside the image: they are resolved inside the image's own root in the
guest, never on the host, where nothing is unpacked.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import lzma
import subprocess
import tarfile
import threading
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import IO, Any

from capsa.errors import ImageError
from capsa.image.oci import Archive, Layer
from capsa.image.rootfs import _require

log = logging.getLogger(__name__)

MERGE_VERSION = "1"  # part of every cache key: bump when the merged tree could change
SQUASH_TIMEOUT = 1800.0
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
_KEEP_PAX = ("SCHILY.xattr.", "LIBARCHIVE.xattr.")
_CHUNK = 1 << 20


class _Hashing:
    """A reader that hashes what passes through it."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.sha = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.sha.update(data)
        return data

    def drain(self) -> str:
        while self.read(_CHUNK):
            pass
        return "sha256:" + self.sha.hexdigest()


def _compression(raw: IO[bytes], name: str) -> str:
    magic = raw.read(6)
    raw.seek(0)
    if magic.startswith(b"\x1f\x8b"):
        return "gzip"
    if magic.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    if magic.startswith(b"\x28\xb5\x2f\xfd"):
        raise ImageError(
            f"layer {name} is zstd-compressed, which capsa cannot read yet",
            hint="re-export the image with gzip layers (e.g. `docker save`, `skopeo copy "
            "--dest-compress-format gzip`)",
        )
    return "plain"


def _wrap(reader: IO[bytes], kind: str) -> IO[bytes]:
    if kind == "gzip":
        return gzip.GzipFile(fileobj=reader, mode="rb")  # type: ignore[return-value]
    if kind == "xz":
        return lzma.LZMAFile(reader, "rb")
    return reader


def _clean(name: str, what: str) -> str:
    parts = [p for p in PurePosixPath(name).parts if p not in (".", "/")]
    if ".." in parts:
        raise ImageError(f"{what} escapes the image root: {name!r}")
    return "/".join(parts)


def _ancestors(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


class _Merge:
    """The state of a top-down merge: what upper layers decided."""

    def __init__(self) -> None:
        self.kind: dict[str, bool] = {}  # emitted path -> is a directory
        self.hidden: set[str] = set()  # whited out by an upper layer (with all below)
        self.opaque: set[str] = set()  # lower layers' contents of these directories are hidden
        self.links: list[tarfile.TarInfo] = []  # hard links, written last once targets are known
        self.files: set[str] = set()  # emitted regular files (hard-link targets)

    def visible(self, path: str) -> bool:
        if path in self.kind or path in self.hidden:
            return False
        for parent in _ancestors(path):
            if parent in self.hidden or parent in self.opaque or self.kind.get(parent) is False:
                return False
        return True


def _entry(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo:
    out = tarfile.TarInfo(path)
    out.type, out.mode, out.uid, out.gid = member.type, member.mode, member.uid, member.gid
    out.mtime, out.size, out.linkname = member.mtime, member.size, member.linkname
    out.uname = out.gname = ""
    out.pax_headers = {k: v for k, v in member.pax_headers.items() if k.startswith(_KEEP_PAX)}
    return out


def _apply(merge: _Merge, layer: tarfile.TarFile, out: tarfile.TarFile, name: str, prefix: str) -> None:
    hidden: set[str] = set()
    opaque: set[str] = set()
    dropped: list[str] = []
    for member in layer:
        path = _clean(member.name, f"an entry of layer {name}")
        if not path:
            continue  # the root itself
        folder, _, base = path.rpartition("/")
        if base == OPAQUE:
            opaque.add(folder)
            continue
        if base.startswith(WHITEOUT):
            hidden.add(f"{folder}/{base[len(WHITEOUT) :]}".lstrip("/"))
            continue
        if not merge.visible(path):
            continue
        if not (member.isreg() or member.isdir() or member.issym() or member.islnk() or member.isfifo()):
            dropped.append(path)  # device nodes (the guest's /dev is devtmpfs), unknown types
            continue
        entry = _entry(member, prefix + path)
        merge.kind[path] = member.isdir()
        if member.islnk():
            target = _clean(member.linkname, f"hard link /{path} in layer {name}")
            entry.linkname = target
            merge.links.append(entry)
            continue
        if member.isreg():
            merge.files.add(path)
            out.addfile(entry, layer.extractfile(member))
        else:
            entry.size = 0
            out.addfile(entry)
    merge.hidden |= hidden
    merge.opaque |= opaque
    if dropped:
        log.info("layer %s: dropped %d device nodes or special files: /%s", name, len(dropped),
                 ", /".join(dropped[:5]) + (", ..." if len(dropped) > 5 else ""))  # fmt: skip


def merge_layers(
    archive: Archive, layers: tuple[Layer, ...], out: tarfile.TarFile, prefix: str = ""
) -> None:
    """Write the merged tree of ``layers`` (bottom first) to ``out`` under ``prefix`` (empty, or a
    directory name ending in ``/``), checking every digest."""
    merge = _Merge()
    for layer in reversed(layers):
        with archive.open(layer.name) as raw:
            kind = _compression(raw, layer.name)
            hashed = _Hashing(raw) if layer.verify == "raw" else _Hashing(_wrap(raw, kind))
            stream: Any = _wrap(hashed, kind) if layer.verify == "raw" else hashed  # type: ignore[arg-type]
            try:
                with tarfile.open(fileobj=stream, mode="r|") as tar:
                    _apply(merge, tar, out, layer.name, prefix)
                while stream.read(_CHUNK):
                    pass
                actual = hashed.drain()
            except (tarfile.TarError, EOFError, lzma.LZMAError, gzip.BadGzipFile) as exc:
                raise ImageError(f"layer {layer.name} is not a readable tar: {exc}") from exc
        if actual != layer.digest:
            raise ImageError(
                f"layer {layer.name} does not match its digest",
                hint=f"expected {layer.digest}, read {actual}: the archive is corrupt or altered",
            )
    for link in merge.links:
        if link.linkname in merge.files:
            link.linkname = prefix + link.linkname
            out.addfile(link)
        else:
            log.warning("dropping hard link /%s: its target /%s is not in the image",
                        link.name, link.linkname)  # fmt: skip


def squash(write: Callable[[tarfile.TarFile], None], out: Path) -> Path:
    """Stream the tar that ``write`` produces into ``tar2sqfs``, atomically creating ``out``."""
    tar2sqfs = _require("tar2sqfs", "squashfs-tools-ng")
    partial = out.with_name(f".{out.name}.part")
    argv = [tar2sqfs, "--quiet", "--no-skip", "--force", "--exportable", "--compressor", "lz4",
            "--block-size", "131072", str(partial)]  # fmt: skip
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stderr is not None
    stderr: list[bytes] = []
    reader = threading.Thread(target=lambda: stderr.append(proc.stderr.read()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    watchdog = threading.Timer(SQUASH_TIMEOUT, proc.kill)
    watchdog.start()
    try:
        with tarfile.open(fileobj=proc.stdin, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            write(tar)
        proc.stdin.close()
        rc = proc.wait(timeout=SQUASH_TIMEOUT)
    except BaseException as exc:
        proc.kill()
        proc.wait()
        partial.unlink(missing_ok=True)
        if isinstance(exc, BrokenPipeError):
            reader.join(5)
            text = b"".join(stderr).decode(errors="replace")
            raise ImageError(f"tar2sqfs stopped early: {text[-2000:]}") from exc
        raise
    finally:
        watchdog.cancel()
    reader.join(5)
    if rc != 0:
        partial.unlink(missing_ok=True)
        raise ImageError(
            f"tar2sqfs failed (exit {rc}): {b''.join(stderr).decode(errors='replace')[-2000:]}"
        )
    partial.replace(out)
    return out
