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

import fcntl
import logging
import subprocess
import tarfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from capsa.errors import ImageError
from capsa.image import tarstream
from capsa.image.oci import Archive, Layer
from capsa.image.rootfs import _require

log = logging.getLogger(__name__)

MERGE_VERSION = "1"  # part of every cache key: bump when the merged tree could change
SQUASH_TIMEOUT = 1800.0
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
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


def _clean(name: str, what: str) -> str:
    parts = [p for p in name.split("/") if p and p != "."]
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
        # hard links (member, path, target), written last once their targets are known
        self.links: list[tuple[tarstream.Member, str, str]] = []
        self.files: set[str] = set()  # emitted regular files (hard-link targets)

    def visible(self, path: str) -> bool:
        if path in self.kind or path in self.hidden:
            return False
        for parent in _ancestors(path):
            if parent in self.hidden or parent in self.opaque or self.kind.get(parent) is False:
                return False
        return True


Write = Callable[[bytes | memoryview], None]
_KEPT = (tarstream.REG, tarstream.DIR, tarstream.SYM, tarstream.LNK, tarstream.FIFO)


def _apply(merge: _Merge, layer: tarstream.Reader, write: Write, name: str, prefix: str) -> None:
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
        kind = member.type
        if kind not in _KEPT:
            dropped.append(path)  # device nodes (the guest's /dev is devtmpfs), unknown types
            continue
        merge.kind[path] = kind == tarstream.DIR
        if kind == tarstream.LNK:
            target = _clean(member.linkname, f"hard link /{path} in layer {name}")
            merge.links.append((member, path, target))
            continue
        if kind == tarstream.REG:
            merge.files.add(path)
            write(tarstream.header(member, prefix + path, ""))
            layer.copy(member.size, write)
            write(tarstream.padding(member.size))
        else:
            link = member.linkname if kind == tarstream.SYM else ""
            write(tarstream.header(member, prefix + path, link))
    merge.hidden |= hidden
    merge.opaque |= opaque
    if dropped:
        log.info("layer %s: dropped %d device nodes or special files: /%s", name, len(dropped),
                 ", /".join(dropped[:5]) + (", ..." if len(dropped) > 5 else ""))  # fmt: skip


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


def merge_layers(
    archive: Archive, layers: tuple[Layer, ...], out: tarfile.TarFile, prefix: str = ""
) -> None:
    """Write the merged tree of ``layers`` (bottom first) to ``out`` under ``prefix`` (empty, or a
    directory name ending in ``/``), checking every digest."""
    merge = _Merge()
    write = _writer(out)
    for layer in reversed(layers):
        with archive.open(layer.name) as raw:
            kind = _compression(raw, layer.name)
            broken: tarstream.TarError | None = None
            with tarstream.Reader(raw, kind, hash_decoded=layer.verify != "raw") as reader:
                try:
                    _apply(merge, reader, write, layer.name, prefix)
                except tarstream.TarError as exc:
                    broken = exc  # a digest mismatch, if any, is the better explanation
                try:
                    actual = reader.digest()
                except tarstream.TarError as exc:
                    broken, actual = broken or exc, layer.digest
        if broken is not None and actual == layer.digest:
            raise ImageError(f"layer {layer.name} is not a readable tar: {broken}") from broken
        if actual != layer.digest:
            raise ImageError(
                f"layer {layer.name} does not match its digest",
                hint=f"expected {layer.digest}, read {actual}: the archive is corrupt or altered",
            )
    for member, path, target in merge.links:
        if target in merge.files:
            write(tarstream.header(member, prefix + path, prefix + target))
        else:
            log.warning("dropping hard link /%s: its target /%s is not in the image",
                        path, target)  # fmt: skip


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
