"""What a build VM wrote: the tar of a step's changes on its output disk, read as hostile bytes.

The guest is root in its build VM and may write anything on the output disk, not only GNU tar's
honest archive. Python's :mod:`tarfile` trusts headers: a 512-byte header claiming 30 GiB makes it
read (or, for a PAX or GNU long-name header, hold in memory) that much of the sparse disk. This
reader bounds everything by what the guest really wrote:

- the *budget* is the run of bytes the guest wrote from the start of the disk: up to the disk's
  first hole (``SEEK_HOLE``: an honest tar is written in one piece; a hole was never written), at
  most :data:`MAX_CAPTURE_BYTES`. Every header and every member's data, padding included, must fit
  in what is left of it *before* a byte of it is read, so a lying size is refused at once;
- the headers themselves are decoded by :mod:`capsa.image.tarheader`, the OCI importer's decoder
  (Go's ``archive/tar`` rules and its limits: checksums, numbers, PAX records, PAX and GNU
  long-name headers of at most ``tarheader.MAX_META`` bytes, ids, extended attributes; sparse
  entries, GNU ``S`` or PAX ``GNU.sparse.*``, are refused there); its :class:`TarError` is a
  :class:`CaptureError` here. On top of that: names at most :data:`MAX_NAME` bytes, at most
  :data:`MAX_CAPTURE_ENTRIES` entries, and multi-volume entries, negative modes or device numbers
  and unknown entry types are refused: GNU tar writes none of them here.

Names and link targets are checked by :class:`capsa.recipes.layertar.LayerTar` (``..`` is refused);
device nodes other than whiteouts are dropped. The reader itself is :mod:`capsa.image.tarreader`
(shared with filesystem snapshots), whose limits are module attributes, read at each use.
"""

from __future__ import annotations

import logging
import posixpath
import tarfile
from typing import IO

from capsa.errors import CaptureError
from capsa.image.sandbox import BUILD_UPPER
from capsa.image.tarheader import BLK, CHR, LNK, REG
from capsa.image.tarreader import MAX_CAPTURE_ENTRIES, MAX_NAME, Reader, written_bytes
from capsa.recipes.layertar import LayerTar

log = logging.getLogger(__name__)

MAX_CAPTURE_BYTES = 32 << 30  # never more than the output disk (recipe_run.MAX_LAYER_BYTES)
_OPAQUE = "SCHILY.xattr.trusted.overlay.opaque"
# Left by capsa itself in the user's root, never part of a layer.
_UPPER = BUILD_UPPER.strip("/")
_SKIP = {_UPPER, "etc/resolv.conf", "etc/hostname"}


def add_captured(layer: LayerTar, disk: IO[bytes]) -> int:
    """Copy the captured upper directory (the tar at the start of ``disk``) into ``layer``;
    returns the number of entries. CaptureError for anything GNU tar would not have written."""
    budget = min(written_bytes(disk), MAX_CAPTURE_BYTES)
    reader = Reader(disk, budget)
    count = 0
    opaque: list[str] = []
    for member in reader:
        path = posixpath.normpath("/" + member.name).strip("/")
        if not path or path in _SKIP or path.startswith(f"{_UPPER}/"):
            continue
        if member.xattrs.get(_OPAQUE) == b"y":
            opaque.append(path)
        if member.type in (CHR, BLK) and not (
            member.type == CHR and member.devmajor == 0 and member.devminor == 0
        ):
            continue  # device nodes: the guest's /dev is devtmpfs; 0/0 is a whiteout
        info = tarfile.TarInfo(path)
        info.type, info.mode, info.mtime = member.type, member.mode, member.mtime
        info.uid, info.gid, info.linkname = member.uid, member.gid, member.linkname
        info.devmajor, info.devminor = member.devmajor, member.devminor
        if member.type == LNK:
            info.linkname = member.linkname.removeprefix("./")
        if member.type == REG:
            info.size = member.size
            layer.add(info, reader.data())
        else:
            layer.add(info)
        count += 1
    log.debug("capture: %d entries, %d of %d budget bytes unread", count, reader.left, budget)
    if opaque:  # mostly directories new to the image (nothing below to hide): not worth a warning
        log.info(
            "run(): opaque directories keep the entries of the layers below, if any: /%s",
            ", /".join(opaque[:5]),
        )
    return count


__all__ = ["MAX_CAPTURE_ENTRIES", "MAX_NAME", "CaptureError", "Reader", "add_captured", "written_bytes"]
