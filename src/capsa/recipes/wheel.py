"""A wheel unpacked into a layer's tar, read as hostile input (it comes from someone's index).

Before a byte is unpacked, the zip's central directory is checked: at most
:data:`MAX_WHEEL_MEMBERS` entries, names that stay inside the wheel's root, no duplicate names, no
entries whose data overlap (the trick of zip bombs that reuse one compressed stream), and declared
uncompressed sizes that add up to at most :func:`budget` (a floor, :data:`WHEEL_RATIO` times the
wheel's own size, never over :data:`MAX_WHEEL_BYTES`): a 255 KiB wheel claiming 557 MiB is refused
at once. Declared sizes can lie, so the bytes actually inflated are counted too, against the same
budget, and nothing is held in memory but small metadata files (at most :data:`MAX_META` bytes).
The limits are module attributes, read at each use: set them to accept a larger wheel.

:func:`direct_references` reads the ``Requires-Dist`` of a downloaded wheel: a dependency given as
``name @ url`` makes the whole ``pip_install`` fail (it would have read a host path or any URL).
"""

from __future__ import annotations

import configparser
import email.parser
import io
import itertools
import logging
import posixpath
import tarfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from capsa.errors import ImageError
from capsa.image.rootfs import GUEST_PYTHON
from capsa.recipes.layertar import LayerTar

log = logging.getLogger(__name__)

_MAJOR, _MINOR = GUEST_PYTHON
SITE = f"usr/local/lib/python{_MAJOR}.{_MINOR}/dist-packages"
BIN = "usr/local/bin"
_SCHEMES = {"purelib": SITE, "platlib": SITE, "scripts": BIN, "data": "usr/local",
            "headers": f"usr/local/include/python{_MAJOR}.{_MINOR}"}  # fmt: skip

MAX_WHEEL_BYTES = 8 << 30  # uncompressed, one wheel (the largest CUDA wheels: about 3 GiB)
WHEEL_RATIO = 100  # uncompressed / compressed: real wheels are 2-10x, deflate tops out near 1000x
WHEEL_FLOOR = 64 << 20  # a small wheel may always expand to this much
MAX_WHEEL_MEMBERS = 200_000
MAX_META = 16 << 20  # METADATA, entry_points.txt and scripts rewritten in memory
_HINT = (
    "the wheel is refused as a zip bomb; if it is genuine, raise capsa.recipes.wheel's "
    "MAX_WHEEL_BYTES / WHEEL_RATIO / MAX_WHEEL_MEMBERS"
)


def budget(wheel_size: int) -> int:
    """How many uncompressed bytes a wheel of ``wheel_size`` bytes may hold."""
    return min(MAX_WHEEL_BYTES, max(WHEEL_FLOOR, WHEEL_RATIO * wheel_size))


def _open(wheel: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile, ValueError) as exc:
        raise ImageError(f"{wheel.name} is not a readable wheel: {exc}") from exc


def _safe(name: str, wheel: Path) -> str:
    parts = name.split("/")
    if name.startswith("/") or ".." in parts or "\\" in name or "\0" in name or not name.strip("/"):
        raise ImageError(f"the wheel {wheel.name} has an entry escaping its root: {name!r}")
    return posixpath.normpath(name)


def _check(archive: zipfile.ZipFile, wheel: Path) -> list[zipfile.ZipInfo]:
    """The wheel's file entries, once its central directory passed the checks above."""
    infos = archive.infolist()
    if len(infos) > MAX_WHEEL_MEMBERS:
        raise ImageError(f"{wheel.name} has {len(infos)} entries (at most {MAX_WHEEL_MEMBERS})",
                         hint=_HINT)  # fmt: skip
    limit = budget(wheel.stat().st_size)
    declared = sum(info.file_size for info in infos)
    if declared > limit:
        raise ImageError(
            f"{wheel.name} ({wheel.stat().st_size} bytes) expands to {declared} bytes, over its "
            f"limit of {limit}",
            hint=_HINT,
        )
    names: set[str] = set()
    for info in infos:
        name = _safe(info.filename, wheel)
        if name in names:
            raise ImageError(f"{wheel.name} holds {name!r} twice")
        names.add(name)
    spans = sorted((info.header_offset, info.compress_size) for info in infos)
    for (offset, size), (following, _) in itertools.pairwise(spans):
        if offset + size >= following:  # a local header (30+ bytes) precedes every entry's data
            raise ImageError(f"{wheel.name} has overlapping entries", hint=_HINT)
    return [info for info in infos if not info.is_dir()]


class _Counted(io.RawIOBase):
    """A member's inflated bytes, counted against the wheel's budget as they are read."""

    def __init__(self, raw: IO[bytes], spend: Callable[[int], None]) -> None:
        self._raw = raw
        self._spend = spend

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size if size >= 0 else MAX_META)
        self._spend(len(data))
        return data


def _read_small(archive: zipfile.ZipFile, info: zipfile.ZipInfo, wheel: Path) -> bytes:
    if info.file_size > MAX_META:
        raise ImageError(f"{wheel.name}: {info.filename} is over {MAX_META} bytes")
    with archive.open(info) as fh:
        return fh.read(MAX_META + 1)[:MAX_META]


def _dist_info(names: list[zipfile.ZipInfo], wheel: Path) -> str:
    found = {i.filename.split("/")[0] for i in names if i.filename.endswith(".dist-info/WHEEL")}
    if len(found) != 1:
        raise ImageError(f"{wheel.name} has {len(found)} .dist-info/WHEEL files: not a wheel")
    return found.pop()


def direct_references(wheel: Path) -> list[str]:
    """The ``Requires-Dist`` entries of ``wheel`` that are direct references (``name @ url``)."""
    with _open(wheel) as archive:
        names = _check(archive, wheel)
        dist_info = _dist_info(names, wheel)
        meta = next((i for i in names if i.filename == f"{dist_info}/METADATA"), None)
        if meta is None:
            raise ImageError(f"{wheel.name} has no {dist_info}/METADATA: not a wheel")
        text = _read_small(archive, meta, wheel).decode("utf-8", "replace")
    headers = email.parser.HeaderParser().parsestr(text)
    return [str(req) for req in headers.get_all("Requires-Dist") or [] if "@" in str(req).split(";")[0]]


def unpack(layer: LayerTar, wheel: Path) -> int:
    """Unpack ``wheel`` into ``layer`` (site-packages, scripts in ``/usr/local/bin``); returns
    the uncompressed bytes written. ImageError for anything a wheel must not be."""
    limit = budget(wheel.stat().st_size)
    spent = 0

    def spend(count: int) -> None:
        nonlocal spent
        spent += count
        if spent > limit:
            raise ImageError(f"{wheel.name} inflates past its limit of {limit} bytes", hint=_HINT)

    with _open(wheel) as archive:
        names = _check(archive, wheel)
        dist_info = _dist_info(names, wheel)
        data_dir = dist_info.removesuffix(".dist-info") + ".data"
        now = int(time.time())
        for info in names:
            name = posixpath.normpath(info.filename)
            target = f"{SITE}/{name}"
            mode = (info.external_attr >> 16) & 0o777 or 0o644
            script = False
            if name.startswith(data_dir + "/"):
                scheme, _, rest = name[len(data_dir) + 1 :].partition("/")
                if scheme not in _SCHEMES or not rest:
                    raise ImageError(f"{wheel.name}: unknown data scheme in {name!r}")
                target = f"{_SCHEMES[scheme]}/{rest}"
                script = scheme == "scripts"
                mode = 0o755 if script else mode
            tar_info = tarfile.TarInfo(target)
            tar_info.size, tar_info.mode, tar_info.mtime = info.file_size, mode, now
            try:
                if script and info.file_size <= MAX_META:  # `#!python` becomes the guest's python
                    content = _read_small(archive, info, wheel)
                    spend(len(content))
                    if content.startswith(b"#!python"):
                        content = b"#!/usr/bin/python3" + content[len(b"#!python") :]
                    tar_info.size = len(content)
                    layer.add(tar_info, io.BytesIO(content))
                else:
                    with archive.open(info) as raw:
                        layer.add(tar_info, _Counted(raw, spend))
            except (OSError, zipfile.BadZipFile, EOFError, ValueError) as exc:
                raise ImageError(f"{wheel.name}: cannot read {info.filename}: {exc}") from exc
        entry_points = next((i for i in names if i.filename == f"{dist_info}/entry_points.txt"), None)
        if entry_points is not None:
            text = _read_small(archive, entry_points, wheel).decode(errors="replace")
            _scripts(layer, text, now)
    return spent


_SCRIPT = """#!/usr/bin/python3
import sys
from {module} import {head}
if __name__ == "__main__":
    sys.exit({call}())
"""


def _scripts(layer: LayerTar, text: str, mtime: int) -> None:
    """``console_scripts`` / ``gui_scripts`` entry points as ``/usr/local/bin`` launchers."""
    parser = configparser.ConfigParser(interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    try:
        parser.read_string(text)
    except configparser.Error as exc:
        log.warning("ignoring malformed entry_points.txt: %s", exc)
        return
    for section in ("console_scripts", "gui_scripts"):
        if not parser.has_section(section):
            continue
        for name, spec in parser.items(section):
            module, _, attr = spec.partition(":")
            attr = attr.split("[")[0].strip()
            module = module.strip()
            if not name or "/" in name or name in (".", "..") or not module or not attr:
                continue
            head = attr.split(".")[0]
            script = _SCRIPT.format(module=module, head=head, call=attr).encode()
            info = tarfile.TarInfo(f"{BIN}/{name}")
            info.size, info.mode, info.mtime = len(script), 0o755, mtime
            layer.add(info, io.BytesIO(script))
