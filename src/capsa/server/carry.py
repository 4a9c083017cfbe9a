"""A save of a running sandbox (a fork, ``create_snapshot``) holds copies of its running commands
and code interpreter (a snapshot keeps processes). :func:`holding` notes, while the save is taken,
which guest processes those are; a sandbox restored from the save takes them up
(:func:`carry_over`): its ``commands.list()`` and ``commands.connect(pid)`` show the commands as
the saved sandbox's do, and its interpreter is the copy, with the variables it had.

The interpreter is held between two cells for the save (requests wait the fraction of a second
the save takes). One busy with a cell when the save comes is not waited for (the cell may run for
hours): its copy, caught mid-answer, is stopped and the restored sandbox starts a fresh one."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from capsa.errors import CapsaError
from capsa.server.entry import Entry
from capsa.server.envd import ProcessTable
from capsa.server.interpreter import Interpreter
from capsa.server.limits import Limits

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Carried:
    """The saved sandbox's processes, by guest pid, as the save caught them."""

    commands: dict[int, tuple[dict[str, Any], str | None]] = field(default_factory=dict)
    limits: Limits | None = None  # its command table's, for the restored sandbox's table
    interpreter: int | None = None  # pid of its idle interpreter, taken up with its variables
    busy: int | None = None  # pid of an interpreter caught mid-cell: its copy is stopped
    envs: dict[str, str] = field(default_factory=dict)  # the interpreter's environment
    contexts: dict[str, dict[str, str]] = field(default_factory=dict)  # and its contexts


@contextlib.asynccontextmanager
async def holding(entry: Entry) -> AsyncIterator[Carried]:
    """Around the save of ``entry``: what a sandbox restored from it will find."""
    table, interpreter = entry.processes, entry.interpreter
    commands = table.configs() if table is not None else {}
    limits = table.limits if table is not None else None
    if interpreter is None:
        yield Carried(commands, limits)
        return
    async with interpreter.saving() as idle:
        envs, contexts = interpreter.state()
        busy = interpreter.pid if idle is None else None
        yield Carried(commands, limits, idle, busy, envs, contexts)


async def carry_over(carried: Carried, child: Entry) -> None:
    """Give ``child`` (restored from a save) the saved sandbox's commands and interpreter; never
    raises: a process that cannot be taken up is logged and left (killed with the sandbox)."""
    try:
        listed = await child.vm.agent.processes()
    except CapsaError as exc:
        log.warning("sandbox %s: listing its processes failed: %s", child.id, exc.message)
        return
    for info in listed:
        if info.attached or not info.running:
            continue
        try:
            if info.pid == carried.busy:
                with contextlib.suppress(CapsaError):
                    copy = await child.vm.agent.attach(info.pid)
                    await copy.kill()
                    await copy.wait(10)
            elif info.pid == carried.interpreter:
                process = await child.vm.agent.attach(info.pid)
                child.interpreter = Interpreter.adopt(child.vm, process, carried.envs, carried.contexts)
            elif info.pid in carried.commands:  # else started outside capsa serve's commands: left
                if child.processes is None:
                    child.processes = ProcessTable(child.vm, child.envs, carried.limits or Limits())
                config, tag = carried.commands[info.pid]
                await child.processes.adopt(info, config, tag)
        except CapsaError as exc:
            log.warning("sandbox %s: process %d not taken up: %s", child.id, info.pid, exc.message)


__all__ = ["Carried", "carry_over", "holding"]
