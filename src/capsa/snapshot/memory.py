"""Split a full migration stream into a memory image and a RAM-less state stream.

A running sandbox's RAM is anonymous memory, so QEMU can only save it inside the migration stream.
Restoring that stream copies every page into each clone. Instead, a short-lived helper QEMU (never
resumed) loads the stream into RAM backed by ``<dir>/memory`` with ``share=on``, which writes the RAM
into the file, and saves its devices again with ``x-ignore-shared``, which leaves the RAM out.
Restores then map the image privately: pages are read from the page cache on first touch (no copy
up front, so restores are faster) and shared by every clone until one writes to them.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import replace
from pathlib import Path

from capsa.errors import CapsaError, SnapshotError
from capsa.net.gateway import VirtualNetwork
from capsa.snapshot.migration import load_state, save_state
from capsa.snapshot.store import MEMORY, STATE
from capsa.snapshot.stream import UnsupportedStream, ram_block_name, split_stream
from capsa.vm.config import MemoryFile, VMConfig
from capsa.vm.handle import VM, start_incoming

log = logging.getLogger(__name__)

_PAGE = 4096
_CHUNK = 1 << 20
_ZERO_PAGE = bytes(_PAGE)
_ZERO_CHUNK = bytes(_CHUNK)


async def write_snapshot_files(
    config: VMConfig, stream: Path, work: Path, directory: Path, timeout: float
) -> str:
    """``directory``'s memory image and state from the full migration ``stream`` of a VM started
    with ``config`` (``stream`` is removed). Split in-process (:mod:`capsa.snapshot.stream`); a
    stream layout the splitter does not know goes through the helper QEMU. Returns which was used."""
    memory, state = directory / MEMORY, directory / STATE
    try:
        async with asyncio.timeout(timeout):
            await asyncio.to_thread(split_stream, stream, memory, state, ram_block_name(config.machine))
    except UnsupportedStream as exc:
        log.warning("migration stream not split in-process (%s); using a helper QEMU", exc)
        memory.unlink(missing_ok=True)
        state.unlink(missing_ok=True)
    except TimeoutError:
        raise SnapshotError(f"writing the memory image took over {timeout:.0f}s", path=memory) from None
    else:
        stream.unlink(missing_ok=True)  # noqa: ASYNC240
        return "in-process"
    await split_memory(config, stream, work / MEMORY, state, timeout)
    await place_memory_image(work / MEMORY, memory)
    return "helper"


def _without_forwards(network: VirtualNetwork | None) -> VirtualNetwork | None:
    """The helper needs the same NIC, but must not bind the source's forwarded host ports."""
    if network is None:
        return None
    return VirtualNetwork(replace(network.gateway, forwards=()))


async def split_memory(
    config: VMConfig, stream: Path, memory: Path, state: Path, timeout: float
) -> None:
    """Write ``memory`` (raw RAM, sparse) and ``state`` (devices only) from the full ``stream`` of
    a VM started with ``config``; ``stream`` is removed."""
    helper_config = replace(
        config,
        memory_file=MemoryFile(memory, shared=True),
        network=_without_forwards(config.network),
        name=None,
    )
    helper = VM(helper_config)
    try:
        async with asyncio.timeout(timeout):
            monitor = await start_incoming(helper, timeout)
            await load_state(monitor, stream, timeout)
            await save_state(monitor, state, timeout, ignore_shared=True)
    except TimeoutError:
        raise SnapshotError(f"writing the memory image took over {timeout:.0f}s", path=memory) from None
    except CapsaError as exc:
        if isinstance(exc, SnapshotError):
            raise
        raise SnapshotError(
            f"writing the memory image failed: {exc}",
            path=memory,
            hint=f"the image needs up to {config.memory_mb} MiB free where {memory.parent} is",
        ) from exc
    finally:
        await helper.kill()
        stream.unlink(missing_ok=True)  # noqa: ASYNC240 - one local unlink


async def place_memory_image(source: Path, target: Path) -> None:
    """Copy the helper's image to ``target`` with only its non-zero pages, then sync it.

    The helper's RAM file is fully allocated: loading the stream reads every page (each zero page
    too), and a read fault on a shared tmpfs mapping allocates the page. The copy leaves those pages
    as holes, so a fork's image in the runtime dir and a snapshot on disk hold only what the guest
    really uses (tens of MiB of a 512 MiB guest)."""
    await asyncio.to_thread(_copy_nonzero_pages, source, target)
    source.unlink()  # noqa: ASYNC240 - one local unlink


def _copy_nonzero_pages(source: Path, target: Path) -> None:
    src = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    dst = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        size = os.fstat(src).st_size
        for offset in range(0, size, _CHUNK):
            chunk = os.pread(src, _CHUNK, offset)
            if chunk != _ZERO_CHUNK[: len(chunk)]:
                _write_nonzero(dst, chunk, offset)
        os.ftruncate(dst, size)
        os.fsync(dst)
    finally:
        os.close(src)
        os.close(dst)


def _write_nonzero(fd: int, chunk: bytes, offset: int) -> None:
    """Write the runs of non-zero pages of ``chunk`` (which starts at ``offset``)."""
    view = memoryview(chunk)
    run = -1  # start of the current run of non-zero pages
    for page in range(0, len(chunk) + _PAGE, _PAGE):
        zero = page >= len(chunk) or chunk[page : page + _PAGE] == _ZERO_PAGE
        if not zero and run < 0:
            run = page
        elif zero and run >= 0:
            data = view[run:page]
            while data:
                written = os.pwrite(fd, data, offset + run)
                data, run = data[written:], run + written
            run = -1
