"""A volume as a sandbox mounts it: which volume, where in the guest, read-write or read-only."""

from __future__ import annotations

from dataclasses import dataclass

from capsa.errors import VolumeError
from capsa.volume.store import Volume

MAX_VOLUMES = 8


@dataclass(frozen=True)
class VolumeMount:
    volume: Volume
    guest_path: str
    read_only: bool = False


def serial(index: int) -> str:
    """The virtio-blk serial the guest finds a volume's device by (``/sys/block/vdX/serial``):
    the probe order of virtio-mmio devices is not the command line's."""
    return f"capsa-vol-{index}"


def mount_options(read_only: bool) -> str:
    # noload: a read-only mount must not replay the journal (the device refuses writes).
    # errors=remount-ro: a corrupt filesystem (another guest may have written anything) stops
    # writes instead of spreading the damage.
    # noatime: reading a file never writes the volume (which would void a snapshot's record of it).
    return "ro,noload,noatime" if read_only else "rw,noatime,errors=remount-ro"


# Run by the guest's /bin/sh: find the disk by serial, make the mount point, mount it.
MOUNT_SCRIPT = r"""
dev=""
for d in /sys/block/vd*; do
  [ "$(cat "$d/serial" 2>/dev/null)" = "$1" ] && dev="/dev/${d##*/}"
done
[ -n "$dev" ] || { echo "no disk with serial $1" >&2; exit 1; }
# Larger readahead: fewer virtio-blk requests per large read (as for virtio-fs shares).
echo 4096 > "/sys/block/${dev#/dev/}/queue/read_ahead_kb" 2>/dev/null
mkdir -p "$2" && mount -t ext4 -o "$3" "$dev" "$2"
"""


def check_mounts(mounts: tuple[VolumeMount, ...]) -> None:
    if len(mounts) > MAX_VOLUMES:
        raise VolumeError(f"at most {MAX_VOLUMES} volumes per sandbox")
    paths = [m.volume.path.resolve() for m in mounts]
    if len(set(paths)) != len(paths):
        raise VolumeError("the same volume is mounted twice in one sandbox")
    guests = [m.guest_path for m in mounts]
    if len(set(guests)) != len(guests):
        raise VolumeError("two volumes use the same guest path")
