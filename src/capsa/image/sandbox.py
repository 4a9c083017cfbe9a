"""The default sandbox guest: Debian kernel + capsa initramfs + read-only Debian root filesystem.

The root filesystem (slow to build, rarely changes) and the initramfs (milliseconds to build, changes
with capsa's init) are cached separately under ``<cache>/images/``, each keyed by the hash of its
recipe, so upgrading capsa never re-runs mmdebstrap unless the package list changed.

At boot the initramfs mounts the SquashFS root read-only under a tmpfs overlay, so every sandbox starts
from the same clean state and nothing it writes survives it, then copies the guest agent (shipped in
the initramfs, so changing the agent never rebuilds the rootfs) into it and runs it as PID 1.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import py_compile
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from capsa._paths import cache_dir
from capsa.errors import ImageError
from capsa.image import rootfs
from capsa.image.initramfs import cached_initramfs
from capsa.image.kernels import GuestKernel, KernelKind, default_kernel

ROOT_READY_MARKER = "CAPSA-ROOT-READY"
INIT_ERROR_MARKER = "CAPSA-INIT-ERROR"
MODULES = (
    "virtio_mmio",
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
    "virtio_rng",
    "squashfs",
    "overlay",
    "virtio_net",
    "virtiofs",  # shares (the stock cloud kernel has no 9p; capsa's kernel has both built in)
    "button",  # the ACPI power button, so vm.stop() is graceful even without the agent's help
    "evdev",
)
AGENT_DIR = "/usr/lib/capsa"  # where the agent lands in the guest root
# With a user image (capsa.Image): where the init mounts the user's root in capsa's, and where it
# copies the image's config (agent/guest/userroot.py has the same paths).
USER_ROOT = "/run/capsa/root"
IMAGE_CONFIG = "capsa-image.json"
IMAGE_CONFIG_COPY = "/run/capsa/image.json"
# Recipe layers (capsa.recipes.recipe): beside the config, a layer's depth in the stack (1 = bottom) and
# a marker saying the stack sits on capsa's own root (Image.debian()); where a build VM sees the
# writable layer of the user's root.
LAYER_DEPTH = "capsa-depth"
LAYER_BASE = "capsa-base"
BUILD_UPPER = "/.capsa-upper"
# A build VM's own disks, told apart from the layers by a tag in their first 16 bytes (the host writes
# it; ext4 leaves its first 1024 bytes alone, the captured tar overwrites it): an ext4 scratch disk
# that holds the writable layers instead of a RAM-backed tmpfs, and a raw disk that receives the tar
# of what a step changed (its device name is in BUILD_OUTPUT_NAME, under BUILD_UPPER).
BUILD_SCRATCH_TAG = b"CAPSA-BUILD-RW00"
BUILD_OUTPUT_TAG = b"CAPSA-BUILD-OUT0"
BUILD_OUTPUT_NAME = "output-device"
# Where capsa's root shows its own writable layer (the tmpfs: ``upper`` and overlayfs's ``work``).
WRITABLE_LAYER = "/run/capsa/rw"
AGENT_COMMAND = f"/usr/bin/python3 -E -s {AGENT_DIR}/capsa-agent"
_LAUNCHER = b"""#!/usr/bin/python3 -E -s
from capsa.agent.guest.main import main

main()
"""


def sandbox_init(command: str = AGENT_COMMAND) -> str:
    """The initramfs ``/init``: mount the root, copy the agent into it, ``switch_root`` to
    ``command`` (the agent, as PID 1). Benchmarks substitute ``command`` to measure floors."""
    return f"""#!/bin/sh
fail() {{ echo "{INIT_ERROR_MARKER}: $*"; poweroff -f; }}
mount -t proc proc /proc
cmdline=$(cat /proc/cmdline)
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in /lib/modules/*.ko; do insmod "$m" 2>/dev/null; done
echo 1 > /proc/sys/kernel/printk
mkdir -p /lower /rw /newroot
image=""
build=""
scratch=""
output=""
for arg in $cmdline; do
  case "$arg" in
    capsa.image) image=1;;
    capsa.image=*) image="${{arg#capsa.image=}}";;
    capsa.build) build=0;;
    capsa.build=*) build="${{arg#capsa.build=}}";;
  esac
done
if [ -n "$image" ]; then
  # A user image (capsa.Image): $image read-only layers besides capsa's root, on disks that may
  # enumerate in any order. Each layer holds {IMAGE_CONFIG} and its depth ({LAYER_DEPTH}, 1 when
  # absent; a recipe leaves out layers that only changed the config, so depths may skip), capsa's
  # root holds neither. The deepest layer is the top; if it is marked {LAYER_BASE}, the stack sits
  # on capsa's root.
  case "$image" in *[!0-9]*|0) fail "malformed capsa.image=$image";; esac
  case "$build" in *[!0-9]*) fail "malformed capsa.build=$build";; esac
  want=$((image + 1 + ${{build:-0}}))
  i=0
  while :; do
    set -- /sys/block/vd*
    [ -e "$1" ] && [ $# -ge $want ] && break
    i=$((i + 1)); [ $i -gt 500 ] && fail "expected $want disks (capsa's root, $image layers, build's)"
    sleep 0.01
  done
  mkdir -p /d
  max=0
  for dev in "$@"; do
    dev=${{dev##*/}}
    if [ -n "$build" ]; then
      case "$(head -c 16 /dev/$dev 2>/dev/null)" in
        {BUILD_SCRATCH_TAG.decode()}) scratch=/dev/$dev; continue;;
        {BUILD_OUTPUT_TAG.decode()}) output=/dev/$dev; continue;;
      esac
    fi
    mkdir -p /d/$dev
    mount -t squashfs -o ro /dev/$dev /d/$dev || fail "cannot mount the squashfs on /dev/$dev"
    if [ -e /d/$dev/{IMAGE_CONFIG} ]; then
      depth=1
      [ -e /d/$dev/{LAYER_DEPTH} ] && read -r depth < /d/$dev/{LAYER_DEPTH}
      case "$depth" in *[!0-9]*|"") fail "layer /dev/$dev has a malformed depth";; esac
      eval "layer_$depth=/d/$dev"
      [ "$depth" -gt $max ] && max=$depth
    else
      mount --move /d/$dev /lower || fail "cannot move capsa's root from /dev/$dev"
    fi
  done
  [ -x /lower/usr/bin/python3 ] || fail "no capsa root disk among the disks"
  [ $max -gt 0 ] || fail "no image layer among the disks"
  eval "top=\\$layer_$max"
  lowers=""
  n=0
  d=$max
  while [ $d -gt 0 ]; do
    eval "l=\\$layer_$d"
    [ -n "$l" ] && lowers="$lowers${{lowers:+:}}$l/rootfs" && n=$((n + 1))
    d=$((d - 1))
  done
  [ $n -eq $image ] || fail "found $n image layers, expected $image (two with the same depth?)"
  [ -e $top/{LAYER_BASE} ] && lowers="$lowers:/lower"
else
  i=0
  while [ ! -b /dev/vda ]; do
    i=$((i + 1)); [ $i -gt 500 ] && fail "no root disk /dev/vda (virtio-blk driver missing?)"
    sleep 0.01
  done
  mount -t squashfs -o ro /dev/vda /lower || fail "cannot mount the squashfs root on /dev/vda"
fi
if [ -n "$scratch" ]; then
  # A build VM: the writable layers on a (sparse, host-side) ext4 disk, not limited by guest memory.
  mount -t ext4 -o noinit_itable,nodiscard $scratch /rw || fail "cannot mount the build scratch disk"
else
  mount -t tmpfs -o mode=0755 tmpfs /rw || fail "cannot mount tmpfs"
fi
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /newroot \\
  || fail "cannot mount the overlay root (overlay driver missing?)"
# The writable layer, where the agent can pack it (a filesystem snapshot: capsa.sandbox.files_snapshot)
mkdir -p -m 0700 /newroot{WRITABLE_LAYER} && mount --bind /rw /newroot{WRITABLE_LAYER} \\
  || fail "cannot bind the writable layer"
for fs in proc sys dev; do mount --move /$fs /newroot/$fs; done
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts /newroot/dev/pts
mount -t tmpfs -o mode=1777 shm /newroot/dev/shm
if [ -n "$image" ]; then
  # The user's root: the image under its own writable tmpfs layer, with the kernel filesystems.
  # The agent keeps capsa's root and chroots into this one (capsa.agent.guest.userroot).
  user=/newroot{USER_ROOT}
  mkdir -p /rw/iupper /rw/iwork $user
  mount -t overlay overlay -o lowerdir=$lowers,upperdir=/rw/iupper,workdir=/rw/iwork $user \\
    || fail "cannot mount the image's overlay root"
  if [ -n "$build" ]; then
    # A recipe's build VM (capsa.recipes.run): the writable layer, reachable from the user's
    # root so that what a run() step changed can be packed into a new layer.
    mkdir -p $user{BUILD_UPPER} && mount --bind /rw $user{BUILD_UPPER} \\
      || fail "cannot bind the upper layer"
    [ -n "$output" ] && echo $output > /rw/{BUILD_OUTPUT_NAME}
  fi
  for fs in proc sys dev; do
    mkdir -p $user/$fs && mount -o rbind /newroot/$fs $user/$fs || fail "cannot bind /$fs into the image"
  done
  mkdir -p $user/etc $user/tmp
  cp $top/{IMAGE_CONFIG} /newroot{IMAGE_CONFIG_COPY} || fail "cannot copy the image config"
fi
ip link set lo up
net=""
for arg in $cmdline; do case "$arg" in capsa.ip=*) net="${{arg#capsa.ip=}}";; esac; done
if [ -n "$net" ]; then
  i=0
  while [ ! -e /newroot/sys/class/net/eth0 ]; do
    i=$((i + 1)); [ $i -gt 500 ] && fail "no network device eth0 (virtio-net driver missing?)"
    sleep 0.01
  done
  ip link set eth0 up && ip addr add "${{net%,*}}" dev eth0 && ip route add default via "${{net#*,}}" \\
    || fail "cannot configure eth0 with $net"
  echo "nameserver ${{net#*,}}" > /newroot/etc/resolv.conf
  [ -n "$image" ] && cp /newroot/etc/resolv.conf /newroot{USER_ROOT}/etc/resolv.conf
fi
rm -rf /newroot{AGENT_DIR} && cp -r /capsa-agent /newroot{AGENT_DIR} || fail "cannot install the agent"
[ -x /newroot/usr/bin/python3 ] || fail "the root filesystem has no /usr/bin/python3"
echo capsa > /newroot/etc/hostname
hostname capsa
echo {ROOT_READY_MARKER}
exec switch_root /newroot {command}
"""


@functools.lru_cache(maxsize=1)
def agent_files() -> dict[str, bytes]:
    """The guest agent's sources, as initramfs entries under ``/capsa-agent``.

    When the host's Python is the guest's version, the bytecode ships too (unchecked-hash ``.pyc``,
    valid whatever the file times): compiling the agent under TCG would cost every cold start.
    """
    package = Path(__file__).resolve().parent.parent
    files = {
        "capsa-agent/capsa-agent": _LAUNCHER,
        "capsa-agent/capsa/__init__.py": b"",
        "capsa-agent/capsa/agent/__init__.py": b"",
    }
    # wire.py and every module of the guest package: a new guest module can never be left out.
    sources = [package / "agent" / "wire.py", *sorted((package / "agent" / "guest").glob("*.py"))]
    for source in sources:
        files[f"capsa-agent/capsa/{source.relative_to(package).as_posix()}"] = source.read_bytes()
    if sys.version_info[:2] == rootfs.GUEST_PYTHON:
        for name, data in list(files.items()):
            if name.endswith(".py"):
                folder, _, stem = name.rpartition("/")
                pyc = f"{folder}/__pycache__/{stem[:-3]}.{sys.implementation.cache_tag}.pyc"
                files[pyc] = _bytecode(data, name)
    return files


def _bytecode(source: bytes, name: str) -> bytes:
    with tempfile.TemporaryDirectory(prefix="capsa-pyc-") as tmp:
        src, out = Path(tmp) / "src.py", Path(tmp) / "out.pyc"
        src.write_bytes(source)
        py_compile.compile(
            str(src),
            cfile=str(out),
            dfile=f"{AGENT_DIR}/{name.partition('/')[2]}",
            doraise=True,
            invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
        )
        return out.read_bytes()


@dataclass(frozen=True)
class SandboxImage:
    kernel: Path
    initrd: Path
    rootfs: Path
    kernel_version: str
    kernel_kind: KernelKind = "debian"  # "capsa" when capsa's own kernel is built


def _key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def sandbox_image(
    *, build: bool = True, rebuild: bool = False, progress: rootfs.Progress | None = None
) -> SandboxImage:
    """The default sandbox image, built on first use (about a minute) and cached afterwards.

    With ``build=False`` a missing image raises :class:`ImageError` instead of building it;
    ``rebuild=True`` builds the rootfs and initramfs again even if they are cached.
    """
    images = cache_dir() / "images"
    root = images / f"rootfs-{rootfs.SUITE}-{_key(rootfs.recipe())}.sqfs"
    if not build and not root.exists():
        raise ImageError("the sandbox image is not built", hint="run: capsa image build")
    kernel = default_kernel()
    images.mkdir(parents=True, exist_ok=True)
    if rebuild or not root.exists():
        rootfs.build_rootfs(root, progress)  # atomic: replaces the old file only when complete
    initrd = sandbox_initramfs(kernel, images)
    if rebuild:
        initrd.unlink()
        initrd = sandbox_initramfs(kernel, images)
    _prune_initrds(images, initrd)
    return SandboxImage(kernel.path, initrd, root, kernel.release, kernel.kind)


STALE_INITRD_SECONDS = 7 * 86400


def _prune_initrds(images: Path, current: Path) -> None:
    """Initramfs files of other capsa versions go once unused for a week, not at once: another
    installation on this machine (another venv, a CI checkout) may be booting from one right now."""
    now = time.time()
    # A separate stamp says "used now": touching the initrd itself would change its identity and
    # invalidate every template snapshot that records it.
    stamp = images / f".used-{current.name}"
    if not stamp.exists() or now - stamp.stat().st_mtime > 86400:
        stamp.touch()
    for other in images.glob("initrd-*.cpio"):
        other_stamp = images / f".used-{other.name}"
        with contextlib.suppress(OSError):
            used = other_stamp.stat().st_mtime if other_stamp.exists() else other.stat().st_mtime
            if other != current and now - used > STALE_INITRD_SECONDS:
                other.unlink()
                other_stamp.unlink(missing_ok=True)


def sandbox_initramfs(
    kernel: GuestKernel, directory: Path, init: str | None = None, prefix: str = "initrd"
) -> Path:
    """The sandbox initramfs for ``kernel`` (``init`` defaults to the agent-starting one)."""
    return cached_initramfs(
        init or sandbox_init(), directory, prefix, kernel=kernel, modules=MODULES, files=agent_files()
    )
