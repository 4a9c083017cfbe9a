"""How the server saves a sandbox and brings it back: a memory snapshot (``vm.snapshot``: files,
memory, running commands and the interpreter) or, for E2B's ``mode="filesystem"``
(``memory: false``), a filesystem snapshot (:mod:`capsa.sandbox.files_snapshot`: only the
files, and a fresh boot to come back). A directory says which kind it holds, so a resume or a
create from a named snapshot need not be told."""

from __future__ import annotations

from pathlib import Path

import capsa
from capsa.errors import CapsaError
from capsa.sandbox.files_snapshot import is_files_snapshot, restore_files, save_files
from capsa.server.entry import TEMPLATES, ApiError, Entry

_FILES_HINT = "take a full one (the default mode)"


async def build_from(builder: capsa.SandboxBuilder, snapshot: Path) -> capsa.Sandbox:
    """A sandbox from ``snapshot``: restored from a memory snapshot, or booted cold (a new boot:
    new processes, uptime and ``boot_id``, as E2B's filesystem-only resume) with the saved files
    written back. A failure leaves no VM running."""
    if not is_files_snapshot(snapshot):
        return await builder.from_snapshot(snapshot).build()
    vm = await builder.cold().build()
    try:
        await restore_files(vm, snapshot)
    except BaseException:
        await vm.kill()
        raise
    return vm


async def save_files_of(entry: Entry, target: Path, max_bytes: int) -> None:
    """Save ``entry``'s files to ``target``; the sandbox keeps running (its commands too)."""
    if entry.template not in TEMPLATES:
        raise ApiError(
            501,
            f"filesystem-only pauses and snapshots of sandboxes of the named image "
            f"{entry.template!r} are not supported yet (the image has a root of its own)",
            hint=_FILES_HINT,
        )
    try:
        await save_files(entry.vm, target, max_bytes=max_bytes)
    except CapsaError as exc:
        raise ApiError(
            409, f"cannot save the files of sandbox {entry.id!r}: {exc.message}", hint=exc.hint
        ) from None


def forget_processes(entry: Entry) -> None:
    """After a filesystem-only pause: the guest's commands and interpreter end with its VM, so
    their streams end and a resumed sandbox starts without them (a new interpreter on first use)."""
    if entry.processes is not None:
        entry.processes.close()
        entry.processes = None
    if entry.interpreter is not None:
        entry.interpreter.close()
        entry.interpreter = None


async def detach(entry: Entry) -> None:
    """Before a pause: commands and the interpreter go on in the guest (the snapshot keeps them);
    their host handles let go, and clients streaming a command's output are told how to come back."""
    reason = "the sandbox was paused; the command goes on: connect to it again after resuming"
    if entry.processes is not None:
        await entry.processes.detach(reason)
    if entry.interpreter is not None:
        await entry.interpreter.detach()


async def reattach(entry: Entry, vm: capsa.Sandbox) -> None:
    if entry.processes is not None:
        await entry.processes.reattach(vm)
    if entry.interpreter is not None:
        await entry.interpreter.reattach(vm)
