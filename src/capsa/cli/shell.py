"""``capsa shell``: an interactive shell in a fresh sandbox, on a pseudo-terminal via the agent."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import sys
from typing import Any

import capsa
from capsa._tasks import TaskSet
from capsa.cli._network import add_network_arguments
from capsa.cli._terminal import raw_terminal, stdin_chunks
from capsa.cli.exec import add_image_argument, sandbox_from_args
from capsa.errors import AgentError

log = logging.getLogger(__name__)

# A user image may have no bash (busybox, alpine): its login shell, else sh.
_ANY_SHELL = ["/bin/sh", "-c", "command -v bash >/dev/null && exec bash -l; exec sh -l"]


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "shell",
        help="an interactive shell in a fresh sandbox (line editing, Ctrl-C, window size)",
        description=(
            "Boot a fresh sandbox and run a login shell on a pseudo-terminal through the agent. "
            "Exits with the shell's exit status; the sandbox is destroyed afterwards."
        ),
        epilog=(
            "examples:\n  capsa shell\n  capsa shell --share .:/src -- python3\n"
            "  capsa shell --allow-domain pypi.org --allow-domain files.pythonhosted.org\n"
            "  capsa shell --image myapp -- /bin/sh   # an image without bash"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--share", action="append", default=[], metavar="HOST:GUEST[:ro|rw]")
    add_image_argument(parser)
    add_network_arguments(parser)
    parser.add_argument("--cpus", type=int, default=1)
    parser.add_argument("--memory", default="512M")
    parser.add_argument(
        "command", nargs=argparse.REMAINDER, help="program to run (default: bash -l, else sh -l)"
    )
    parser.set_defaults(handler=_shell)


def _shell(args: argparse.Namespace) -> int:
    return asyncio.run(_main(args))


async def _main(args: argparse.Namespace) -> int:
    builder = sandbox_from_args(args)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    own_image = getattr(args, "image", None) is not None
    command = command or (_ANY_SHELL if own_image else ["/bin/bash", "-l"])
    async with await builder.build() as vm:
        size = shutil.get_terminal_size()
        spec = vm.agent.exec(command[0]).args(command[1:]).pty(size.lines, size.columns)
        spec = spec.env("TERM", os.environ.get("TERM", "xterm-256color"))
        if not own_image:  # a user image's WorkingDir is the default there
            spec = spec.cwd("/root")
        process = await spec.spawn()
        loop = asyncio.get_running_loop()
        background = TaskSet(log)  # input pump and resizes: failures are logged, never lost
        if sys.stdin.isatty():
            loop.add_signal_handler(signal.SIGWINCH, _resizer(process, background))
        with raw_terminal():
            background.spawn(_forward_input(process, loop), name="capsa-shell-input")
            try:
                out = sys.stdout.buffer
                async for chunk in process.stdout:
                    out.write(chunk)
                    out.flush()
                return await process.wait()
            finally:
                background.cancel()


def _resizer(process: capsa.Process, background: TaskSet) -> Any:
    def on_winch() -> None:
        size = shutil.get_terminal_size()
        background.spawn(process.resize(size.lines, size.columns), name="capsa-shell-resize")

    return on_winch


async def _forward_input(process: capsa.Process, loop: asyncio.AbstractEventLoop) -> None:
    typed = stdin_chunks("capsa-shell-in")
    try:
        while chunk := await typed.get():
            await process.write_stdin(chunk)
        await process.write_stdin(b"\x04")  # input ended: end-of-file for the terminal's reader
    except AgentError:
        pass  # the shell exited
