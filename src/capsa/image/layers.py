"""Merge container image layers into one tar stream and squash it, without unpacking anything.

The result is what Docker (overlay2) shows for the image. Layers are read top (newest) first, so each
path is decided once (:mod:`capsa.image.mergetree`): an upper layer's entry wins, a whiteout
``.wh.<name>`` hides ``<name>`` (and all below it) in the layers under it, an opaque marker
``.wh..wh..opq`` hides everything the lower layers have inside its directory (at the layer root:
every lower layer), and a non-directory hides what lower layers have below its path. Within a layer
the last entry of a path wins, as Docker applies entries in order: the first merge replays each
layer's headers beside it (:class:`~capsa.image.mergetree.Planner`) and stops at the first entry
that replaces another; :func:`import_layers` then plans every layer and merges again, skipping the
replaced entries. The winning entries stream, in the order they are read, into ``tar2sqfs`` (which
accepts children before parents and hard links before their targets), keeping modes, set-uid bits,
ownership and extended attributes.

Hostile entries: a name or hard-link target with ``..``, or a path over ``PATH_MAX`` / ``NAME_MAX``
raises :class:`ImageError` (so does what :mod:`capsa.image.tarheader` refuses); device nodes are
dropped (the guest's ``/dev`` is devtmpfs); symlinks are kept verbatim, since they are data inside
the image: they are resolved inside the image's own root in the guest, never on the host, where
nothing is unpacked.
"""

from __future__ import annotations

import fcntl
import logging
import subprocess
import tarfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from capsa.errors import ImageError
from capsa.image import mergetree, tarstream
from capsa.image.oci import Archive, Layer
from capsa.image.rootfs import _require
from capsa.image.tarheader import encode

log = logging.getLogger(__name__)

MERGE_VERSION = "2"  # part of every cache key: bump when the merged tree could change
SQUASH_TIMEOUT = 1800.0
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
AUFS_META = ".wh..wh."
_CHUNK = 1 << 20
_DIRECT = 1 << 16  # writes at least this large skip the gathering buffer


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


Write = Callable[[bytes | memoryview], None]
Plan = tuple[frozenset[int], ...]  # per layer (as given, bottom first): the entries to skip
_KINDS = {tarstream.REG: mergetree.FILE, tarstream.DIR: mergetree.DIR}
_KEPT = (tarstream.REG, tarstream.DIR, tarstream.SYM, tarstream.LNK, tarstream.FIFO)


def _whiteout(path: list[str]) -> tuple[str, list[str]] | None:
    """("opaque", the directory) or ("hidden", the path) for a whiteout entry, else None."""
    base = path[-1]
    if not base.startswith(WHITEOUT):
        return None
    if base == OPAQUE:
        return "opaque", path[:-1]
    return "hidden", [*path[:-1], base[len(WHITEOUT) :]]


def _replay(planner: mergetree.Planner, index: int, member: tarstream.Member, path: list[str]) -> None:
    """Replay an entry in its layer's :class:`~capsa.image.mergetree.Planner`, whiteouts included:
    in Docker's diff directory (overlay2) a whiteout is a device node at the path it hides and an
    opaque marker an xattr of its directory, and a later entry replacing that path or a parent
    removes them (``RemoveAll``), so the lower layers show through again: the plan skips them."""
    whiteout = _whiteout(path)
    if whiteout is None:
        planner.add(index, path, member.type == tarstream.DIR)
    elif whiteout[0] == "hidden" and whiteout[1][-1]:
        planner.add_whiteout(index, whiteout[1])
    else:
        planner.add(index, path, False)  # the xattr goes with its directory


def _skipped(path: list[str]) -> bool:
    """The root itself, and AUFS metadata at the layer root (``.wh..wh.plnk``...): Docker skips them."""
    return not path or (path[0].startswith(AUFS_META) and path != [OPAQUE])


@dataclass
class _Merge:
    """The merge's state and output: the tree of decisions, and hard links written last (once
    their targets are known)."""

    write: Write
    prefix: str
    tree: mergetree.Tree = field(default_factory=mergetree.Tree)
    links: list[tuple[tarstream.Member, str, list[str]]] = field(default_factory=list)


def _apply(merge: _Merge, layer: tarstream.Reader, where: str, skip: frozenset[int] | None) -> None:
    """Stream the layer's visible entries. Without a plan (``skip``), replay the layer as Docker
    would on the side, and stop (:class:`~capsa.image.mergetree.Repeated`) at the first entry that
    replaces an earlier one: what was streamed is then wrong, whether it was visible or not."""
    tree, write, prefix = merge.tree, merge.write, merge.prefix
    planner = mergetree.Planner(where) if skip is None else None
    skip = skip or frozenset()
    hidden: list[list[str]] = []
    opaque: list[list[str]] = []
    dropped: list[str] = []
    for index, member in enumerate(layer):
        path = mergetree.parts(member.name, f"an entry of {where}")
        if _skipped(path) or index in skip:
            continue
        whiteout = _whiteout(path)
        kind = member.type
        if planner is not None:
            _replay(planner, index, member, path)
            if planner.superseded:
                raise mergetree.Repeated(f"{where} replaces an earlier entry with /{'/'.join(path)}")
        if whiteout is not None:
            what, target = whiteout
            if what == "opaque":
                opaque.append(target)
            elif target[-1]:
                hidden.append(target)
            continue
        if not tree.claim(path, _KINDS.get(kind, mergetree.OTHER), where):
            continue
        name = "/".join(path)
        if kind not in _KEPT:
            dropped.append(name)  # device nodes (the guest's /dev is devtmpfs), unknown types
        elif kind == tarstream.LNK:
            target = mergetree.parts(member.linkname, f"hard link /{name} in {where}")
            merge.links.append((member, name, target))
        elif kind == tarstream.REG:
            write(tarstream.header(member, prefix + name, ""))
            layer.copy(member.size, write)
            write(tarstream.padding(member.size))
        else:
            link = member.linkname if kind == tarstream.SYM else ""
            if len(encode(link)) >= mergetree.PATH_MAX:
                raise ImageError(f"symlink /{name} in {where} has a target over PATH_MAX")
            write(tarstream.header(member, prefix + name, link))
    tree.end_layer(hidden, opaque)
    if dropped:
        log.info("%s: dropped %d device nodes or special files: /%s", where, len(dropped),
                 ", /".join(dropped[:5]) + (", ..." if len(dropped) > 5 else ""))  # fmt: skip


def _read(archive: Archive, layer: Layer, use: Callable[[tarstream.Reader], None]) -> None:
    """Run ``use`` on the layer's entries, then check the layer's digest (read to its end)."""
    with archive.open(layer.name) as raw:
        kind = _compression(raw, layer.name)
        broken: tarstream.TarError | None = None
        with tarstream.Reader(raw, kind, hash_decoded=layer.verify != "raw") as reader:
            try:
                use(reader)
            except tarstream.TarError as exc:
                broken = exc  # a digest mismatch, if any, is the better explanation
            try:
                actual = reader.digest()
            except tarstream.TarError as exc:
                broken, actual = broken or exc, layer.digest
    if broken is not None and actual == layer.digest:
        raise ImageError(
            f"layer {layer.name} is not a readable tar: {broken}",
            hint="the image is corrupt, or built to attack its importer; Docker refuses it too "
            "unless the message names a capsa limit (docs/images.md)",
        ) from broken
    if actual != layer.digest:
        raise ImageError(
            f"layer {layer.name} does not match its digest",
            hint=f"expected {layer.digest}, read {actual}: the archive is corrupt or altered",
        )


def plan_layers(archive: Archive, layers: tuple[Layer, ...]) -> Plan:
    """For each layer, the entries a later entry of the same path replaces (Docker: the last one
    wins): a header-only pass, needed only by images whose layers repeat a path."""

    def planned(layer: Layer) -> frozenset[int]:
        planner = mergetree.Planner(f"layer {layer.name}")

        def use(reader: tarstream.Reader) -> None:
            for index, member in enumerate(reader):
                path = mergetree.parts(member.name, f"an entry of layer {layer.name}")
                if not _skipped(path):
                    _replay(planner, index, member, path)

        _read(archive, layer, use)
        return frozenset(planner.superseded)

    return tuple(planned(layer) for layer in layers)


def merge_layers(
    archive: Archive, layers: tuple[Layer, ...], out: tarfile.TarFile, prefix: str = "",
    plan: Plan | None = None,
) -> None:  # fmt: skip
    """Write the merged tree of ``layers`` (bottom first) to ``out`` under ``prefix`` (empty, or a
    directory name ending in ``/``), checking every digest. Without a ``plan``, a layer that repeats
    a path raises :class:`~capsa.image.mergetree.Repeated` (see :func:`import_layers`)."""
    merge = _Merge(_writer(out), prefix)
    for position in reversed(range(len(layers))):
        layer = layers[position]
        skip = plan[position] if plan is not None else None
        where = f"layer {layer.name}"
        _read(archive, layer, lambda r: _apply(merge, r, where, skip))  # noqa: B023 - called here
    for member, path, target in merge.links:
        if merge.tree.is_file(target):
            merge.write(tarstream.header(member, prefix + path, prefix + "/".join(target)))
        else:
            log.warning("dropping hard link /%s: its target /%s is not in the image",
                        path, "/".join(target))  # fmt: skip


def import_layers(
    archive: Archive, layers: tuple[Layer, ...], out: Path, prefix: str,
    extra: Callable[[tarfile.TarFile], None],
) -> Path:  # fmt: skip
    """Merge ``layers`` (then ``extra`` entries) into the SquashFS ``out``. Streaming needs no plan
    unless a layer repeats a path: then the merge is redone with one (:func:`plan_layers`)."""

    def write(plan: Plan | None) -> Callable[[tarfile.TarFile], None]:
        def run(tar: tarfile.TarFile) -> None:
            merge_layers(archive, layers, tar, prefix, plan)
            extra(tar)

        return run

    try:
        return squash(write(None), out)
    except mergetree.Repeated as exc:
        log.info("%s: merging again, the last entry of each path winning", exc)
    return squash(write(plan_layers(archive, layers)), out)


def _writer(tar: tarfile.TarFile) -> Write:
    """Raw bytes into ``tar``'s stream, keeping its offset right for what it writes after us."""
    fileobj: Any = tar.fileobj
    direct = isinstance(fileobj, _Pipe)

    def write(data: bytes | memoryview) -> None:
        if direct:
            fileobj.write(data)
        else:  # another TarFile (e.g. a stream): pieces keep its buffering linear
            view = memoryview(data)
            for start in range(0, len(view), 1 << 16):
                fileobj.write(bytes(view[start : start + (1 << 16)]))
        tar.offset += len(data)

    return write


def _widen(pipe: IO[bytes]) -> None:
    """A 1 MiB pipe (not 64 KiB): far fewer hand-offs between us and tar2sqfs on a busy machine."""
    try:
        fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, _CHUNK)
    except OSError as exc:  # over /proc/sys/fs/pipe-max-size for this user: keep the default
        log.debug("cannot widen the pipe to tar2sqfs: %s", exc)


class _Pipe:
    """The tar stream into ``tar2sqfs``: small writes are gathered, large ones go straight in."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self._buf = bytearray()
        self._count = 0

    def write(self, data: bytes | memoryview) -> int:
        size = len(data)
        self._count += size
        if size >= _DIRECT:
            self.flush()
            self._raw.write(data)
        else:
            self._buf += data
            if len(self._buf) >= _CHUNK:
                self.flush()
        return size

    def tell(self) -> int:
        return self._count

    def flush(self) -> None:
        if self._buf:
            self._raw.write(self._buf)
            self._buf = bytearray()


def squash(write: Callable[[tarfile.TarFile], None], out: Path) -> Path:
    """Stream the tar that ``write`` produces into ``tar2sqfs``, atomically creating ``out``."""
    tar2sqfs = _require("tar2sqfs", "squashfs-tools-ng")
    partial = out.with_name(f".{out.name}.part")
    argv = [tar2sqfs, "--quiet", "--no-skip", "--force", "--exportable", "--compressor", "lz4",
            "--block-size", "131072", str(partial)]  # fmt: skip
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stderr is not None
    _widen(proc.stdin)
    stderr: list[bytes] = []
    reader = threading.Thread(target=lambda: stderr.append(proc.stderr.read()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    watchdog = threading.Timer(SQUASH_TIMEOUT, proc.kill)
    watchdog.start()
    try:
        pipe = _Pipe(proc.stdin)
        with tarfile.TarFile(fileobj=pipe, mode="w", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[arg-type]
            write(tar)
        pipe.flush()
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
