"""A VM's shared directories at launch: each share's mechanism decided, a virtiofsd started per
virtio-fs share (before QEMU, which connects to their sockets as it starts), and each daemon watched
while the guest runs, since a virtiofsd dying under a running guest would hang its filesystem."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path

from capsa.backend.qemu.process import QemuProcess
from capsa.errors import CapsaTimeoutError, ConfigError, ShareError
from capsa.shares.spec import Share, ShareSpec
from capsa.shares.virtiofsd import find_virtiofsd, start_virtiofsd
from capsa.vm.argv import PlannedShare

__all__ = ["start_shares", "watch_daemon"]


async def start_shares(
    specs: Sequence[ShareSpec],
    vm_dir: Path,
    logs: Path,
    *,
    shares: list[Share],
    daemons: list[QemuProcess],
) -> list[PlannedShare]:
    """Decide each share's mechanism and start a virtiofsd per virtio-fs share; returns the plan
    for QEMU's argv. The VM's ``shares`` and ``daemons`` are appended to as each starts, so that a
    failure part way leaves the VM what to clean up."""
    planned: list[PlannedShare] = []
    virtiofsd = find_virtiofsd() if specs else None
    for index, spec in enumerate(specs):
        mechanism = spec.mechanism
        if mechanism == "auto":
            mechanism = "virtiofs" if virtiofsd else "9p"
        tag = f"capsa{index}"
        socket_path = None
        if mechanism == "virtiofs":
            if virtiofsd is None:
                raise ConfigError(
                    "share: virtiofsd not found",
                    hint="apt-get install qemu-system-common, or share with mechanism='9p'",
                )
            socket_path = vm_dir / f"fs{index}.sock"
            log_path = logs / f"virtiofsd-{index}.log"
            daemons.append(await start_virtiofsd(virtiofsd, spec, socket_path, log_path))
        planned.append(PlannedShare(tag, spec.host_path, spec.read_only, mechanism, socket_path))
        shares.append(Share(tag, spec.host_path, spec.guest_path, spec.mode, mechanism))
    return planned


async def watch_daemon(
    daemon: QemuProcess, share: Share, qemu: Callable[[], QemuProcess | None], ending: Callable[[], bool]
) -> ShareError | None:
    """Wait for ``daemon`` to exit. Returns why the VM must stop if it died under a running guest
    (``qemu()``, the VM's QEMU, still running; ``ending()`` false: capsa is not stopping it), else
    None."""
    code = await daemon.exited
    process = qemu()
    if process is not None and process.returncode is None:
        # virtiofsd also exits when QEMU goes away (guest power-off): give that a moment.
        with contextlib.suppress(CapsaTimeoutError):
            await process.wait(1.0)
    if ending() or process is None or process.returncode is not None:
        return None
    return ShareError(
        f"virtiofsd serving {share.host_path} (guest {share.guest_path}) died with status {code}; "
        "the VM was stopped",
        host_path=share.host_path,
        log_tail=daemon.log_tail(),
    )
