"""``Image.run`` (and ``apt_install``): a shell command in a build VM, its changes kept as a layer.

The build VM boots the layers built so far like any sandbox of the image, plus ``capsa.build=N``
on its command line and two disks of its own, sparse files the host creates in
``<cache>/images/build-scratch/`` (and unlinks as soon as QEMU has them open, so a killed build
leaves nothing behind): an ext4 scratch disk that holds the writable layers instead of the usual
RAM-backed tmpfs (so a step may write far more than the VM's memory: a big ``apt_install``), and a
raw output disk. The init binds the writable layer at ``/.capsa-upper`` inside the user's root.
After the command, GNU tar (from capsa's Debian base) packs the user root's upper directory, in
overlayfs's own format (a deleted file is a 0/0 character device: a whiteout, honoured by overlayfs
in every lower layer), straight onto the output disk; the host reads that tar from its own handle on
the disk's file, without holding it in memory, and streams it under ``rootfs/`` into the layer's
SquashFS. The guest is root in its VM: the host parses those bytes as hostile, bounded by what the
guest really wrote (:mod:`capsa.recipes.capture`).

Known limit: a directory that the command removed and created again is "opaque" in the upper
directory (an extended attribute), which the stacked SquashFS layers cannot carry (capsa's kernel
reads no SquashFS xattrs): the lower layers' entries in it stay visible. A warning names it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Coroutine
from dataclasses import replace
from pathlib import Path
from typing import IO, Any, TypeVar

from capsa._paths import cache_dir
from capsa.errors import CapsaError, ExecFailedError, ImageError, StepError
from capsa.image.sandbox import (
    BUILD_OUTPUT_NAME,
    BUILD_OUTPUT_TAG,
    BUILD_SCRATCH_TAG,
    BUILD_UPPER,
)
from capsa.net.gateway import VirtualNetwork
from capsa.sandbox.builder import boot_sandbox, sandbox
from capsa.sandbox.handle import Sandbox
from capsa.vm.config import DiskSpec

log = logging.getLogger(__name__)

BUILD_MEMORY_MB = 1024
BOOT_TIMEOUT = 120.0
CAPTURE_TIMEOUT = 600.0
# Sparse files: they cost the host only what the step writes.
SCRATCH_BYTES = 64 << 30  # the writable layers of a build VM (what a step may write, in all)
MAX_LAYER_BYTES = 32 << 30  # the output disk: the tar of what a step changed
MKFS_TIMEOUT = 60.0
_OUTPUT_TAIL = 8000
# Onto the output disk, then flushed to the host (sync(2) flushes block devices too).
_CAPTURE = (
    f'out=$(cat {BUILD_UPPER}/{BUILD_OUTPUT_NAME}) && [ -b "$out" ] || exit 3; '
    f"tar --xattrs --xattrs-include=trusted.overlay.opaque --format=pax --numeric-owner "
    f'-C {BUILD_UPPER}/iupper --exclude=./{BUILD_UPPER.strip("/")} -cf "$out" .; rc=$?; sync; exit $rc'
)

T = TypeVar("T")


def _blocking(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion from synchronous code, in this thread if it runs no event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def run_in_build_vm(
    below: list[Path],
    command: str,
    *,
    timeout: float,
    network: bool,
    label: str,
    files: dict[str, Path] | None = None,
) -> IO[bytes]:
    """Boot a build VM on the layers ``below`` (bottom first), write ``files`` (guest path: host
    file) into it, run ``command`` with ``/bin/sh -c`` and return the tar of what it changed, as
    an open file (the caller closes it; its name is already gone from the filesystem).
    Raises :class:`StepError` when the command exits non-zero."""
    return _blocking(
        _run(below, command, timeout=timeout, network=network, label=label, files=files or {})
    )


def scratch_root() -> Path:
    return cache_dir() / "images" / "build-scratch"


def _sweep_scratch(root: Path) -> None:
    """Remove the scratch directories of builds whose process is gone (killed between creating
    its disks and booting its VM: afterwards, their names are gone already)."""
    for entry in root.iterdir() if root.is_dir() else []:
        pid = entry.name.partition("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(entry, ignore_errors=True)


def _sparse(path: Path, size: int, tag: bytes) -> None:
    with path.open("r+b" if path.exists() else "wb") as fh:
        fh.truncate(size)
        fh.seek(0)
        fh.write(tag)


def _make_disks(folder: Path) -> tuple[Path, Path | None]:
    """The output disk and (when the host can format it) the ext4 scratch disk."""
    output = folder / "output.img"
    _sparse(output, MAX_LAYER_BYTES, BUILD_OUTPUT_TAG)
    mkfs = shutil.which("mkfs.ext4") or shutil.which("mkfs.ext4", path="/usr/sbin:/sbin")
    if mkfs is None:
        log.warning(
            "mkfs.ext4 not found (e2fsprogs): a build step can write only what fits in half of "
            "the build VM's memory"
        )
        return output, None
    scratch = folder / "scratch.img"
    _sparse(scratch, SCRATCH_BYTES, b"")
    try:
        subprocess.run(
            [mkfs, "-q", "-F", "-m", "0", "-O", "^has_journal",
             "-E", "root_owner=0:0,lazy_itable_init=1,nodiscard", str(scratch)],
            check=True, capture_output=True, timeout=MKFS_TIMEOUT,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        raise ImageError(
            f"cannot format the build VM's scratch disk: {exc}",
            hint=detail.decode(errors="replace")[-2000:] or None,
        ) from exc
    _sparse(scratch, SCRATCH_BYTES, BUILD_SCRATCH_TAG)  # in ext4's unused first 1024 bytes
    return output, scratch


async def _run(
    below: list[Path],
    command: str,
    *,
    timeout: float,
    network: bool,
    label: str,
    files: dict[str, Path],
) -> IO[bytes]:
    builder = sandbox().memory_mb(BUILD_MEMORY_MB)
    if network:
        builder = builder.network(VirtualNetwork())
    config = await builder.vm_config()
    root = scratch_root()
    root.mkdir(parents=True, exist_ok=True)
    _sweep_scratch(root)
    folder = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=root))
    try:
        output_disk, scratch_disk = _make_disks(folder)
        own = [DiskSpec(output_disk)]
        if scratch_disk is not None:
            own.append(DiskSpec(scratch_disk))
        config = replace(
            config,
            disks=(*(DiskSpec(path, read_only=True) for path in below), *own),
            cmdline=(
                *config.cmdline,
                ("capsa.image", str(len(below))),
                ("capsa.build", str(len(own))),
            ),
            name="capsa-image-build",
        )
        output = output_disk.open("rb")
        try:
            vm = await boot_sandbox(config, BOOT_TIMEOUT)
        except BaseException:
            output.close()
            raise
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # QEMU and `output` keep the files open
    try:
        async with vm:
            await _step(vm, command, timeout=timeout, label=label, files=files)
    except BaseException:
        output.close()
        raise
    return output


async def _step(
    vm: Sandbox, command: str, *, timeout: float, label: str, files: dict[str, Path]
) -> None:
    """Write ``files``, run ``command``, pack what it changed onto the output disk."""
    folders = sorted({path.rpartition("/")[0] for path in files})
    if folders:
        made = await vm.agent.exec("mkdir").args(["-p", *folders]).run()
        try:
            made.check()
        except ExecFailedError as exc:
            raise ImageError(f"{label}: cannot create {folders} in the build VM: {made.stderr}") from exc
    for guest, host in files.items():
        await vm.agent.write_file(guest, host.read_bytes(), timeout=CAPTURE_TIMEOUT)
    try:
        result = await (
            vm.agent.exec("/bin/sh").args(["-c", command]).timeout(timeout).max_output(16 << 20).run()
        )
    except CapsaError as exc:
        raise ImageError(f"{label}: the build VM failed: {exc}") from exc
    output = (result.stdout + result.stderr)[-_OUTPUT_TAIL:]
    try:
        result.check()
    except ExecFailedError as exc:
        raise StepError(
            f"{label}: exited with {result.exit_code}",
            command=command,
            exit_code=result.exit_code,
            output=output,
        ) from exc
    if output.strip():
        log.info("%s:\n%s", label, output.rstrip())
    packed = await vm.agent.exec("/bin/sh").args(["-c", _CAPTURE]).timeout(CAPTURE_TIMEOUT).run()
    if packed.exit_code not in (0, 1):  # 1: a file changed while being read (a daemon left?)
        raise ImageError(
            f"{label}: cannot pack what the command changed (tar exited {packed.exit_code})",
            hint=packed.stderr[-2000:] or None,
        )
