"""A fork's guest holds copies of its parent's running commands and code interpreter (a snapshot
keeps processes). The fork takes the commands up, so its ``commands.list()`` and
``commands.connect(pid)`` show them as the parent's do; the interpreter's copy is stopped (a cell
may have been running in it mid-answer), and the fork starts a fresh one on first use."""

from __future__ import annotations

import contextlib
import logging

from capsa.errors import CapsaError
from capsa.server.entry import Entry

log = logging.getLogger(__name__)


async def carry_over(parent: Entry, child: Entry) -> None:
    """Give ``child`` (restored from a save of ``parent``) the parent's commands; never raises:
    a process that cannot be taken up is logged and left (killed when the sandbox is)."""
    table, interpreter = parent.processes, parent.interpreter
    skip = interpreter.pid if interpreter is not None else None
    known = table.configs() if table is not None else {}
    try:
        listed = await child.vm.agent.processes()
    except CapsaError as exc:
        log.warning("fork %s: listing its processes failed: %s", child.id, exc.message)
        return
    for info in listed:
        if info.attached or not info.running:
            continue
        try:
            if info.pid == skip:
                with contextlib.suppress(CapsaError):
                    copy = await child.vm.agent.attach(info.pid)
                    await copy.kill()
                    await copy.wait(10)
                continue
            if info.pid not in known:  # started outside capsa serve's commands: left alone
                continue
            if child.processes is None:
                assert table is not None
                child.processes = table.copy_for(child.vm)
            config, tag = known[info.pid]
            await child.processes.adopt(info, config, tag)
        except CapsaError as exc:
            log.warning("fork %s: process %d not taken up: %s", child.id, info.pid, exc.message)


__all__ = ["carry_over"]
