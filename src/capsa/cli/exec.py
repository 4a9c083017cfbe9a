"""``capsa exec -- CMD ARGS…``: run one command in a fresh sandbox, streaming its output live."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any, BinaryIO

import capsa
from capsa._tasks import TaskSet
from capsa.cli._network import add_network_arguments, network_from_args
from capsa.cli._progress import build_steps
from capsa.cli._terminal import stdin_chunks
from capsa.errors import AgentError, ConfigError, VMNotRunning
from capsa.recipes.store import resolve_image

log = logging.getLogger(__name__)

TIMEOUT_EXIT = 124  # like coreutils timeout(1)


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "exec",
        help="run a command in a fresh sandbox and exit with its exit code",
        description=(
            "Boot a fresh sandbox, run CMD (argv, no shell) in it, stream its stdout and stderr, "
            "power the sandbox off and exit with the command's exit code. Piped stdin is forwarded."
        ),
        epilog=(
            "examples:\n"
            "  capsa exec -- uname -a\n"
            "  capsa exec --env NAME=world -- sh -c 'echo hello $NAME'\n"
            "  capsa exec --share .:/src --share ./out:/out:rw -- sh -c 'cp -r /src/* /out/'\n"
            "  capsa exec --allow-domain pypi.org --allow-domain '*.pythonhosted.org' -- pip download\n"
            "  echo 'print(6 * 7)' | capsa exec -- python3\n"
            "  capsa exec --image myapp -- cat /etc/os-release  # capsa image import X --name myapp\n\n"
            "exit status: the command's own (128+N if signal N killed it); 124 if --timeout or\n"
            "--lifetime ran out;\n"
            "2 if capsa itself failed (the message says why)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--env", action="append", default=[], metavar="K=V", help="set a variable")
    parser.add_argument(
        "--share",
        action="append",
        default=[],
        metavar="HOST:GUEST[:ro|rw]",
        help="share a host directory (read-only unless :rw)",
    )
    add_image_argument(parser)
    add_network_arguments(parser)
    parser.add_argument("--cwd", help="working directory in the guest (absolute)")
    parser.add_argument("--timeout", type=float, help="kill the command after this many seconds")
    parser.add_argument(
        "--lifetime",
        type=float,
        metavar="S",
        help="stop and remove the whole sandbox S seconds after it is ready (exit status 124)",
    )
    parser.add_argument("--cpus", type=int, default=1, help="virtual CPUs (default 1)")
    parser.add_argument("--memory", default="512M", help="guest memory, e.g. 512M or 1G")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command and its arguments")
    parser.set_defaults(handler=_exec)


def parse_memory(text: str) -> int:
    units = {"M": 1, "G": 1024}
    value = text.strip().upper().removesuffix("B")
    factor = units.get(value[-1:])
    number = value[:-1] if factor else value
    if not number.isdigit():
        raise ConfigError(f"--memory takes a size such as 512M or 1G, got {text!r}")
    return int(number) * (factor or 1)


def parse_share(text: str) -> tuple[str, str, capsa.AccessMode]:
    host, sep, rest = text.partition(":")
    guest, _, mode = rest.partition(":")
    modes = {
        "": capsa.AccessMode.READ_ONLY,
        "ro": capsa.AccessMode.READ_ONLY,
        "rw": capsa.AccessMode.READ_WRITE,
    }
    if not sep or not host or not guest or mode not in modes:
        raise ConfigError(f"--share takes HOST:GUEST[:ro|rw], got {text!r}")
    return host, guest, modes[mode]


def _exec(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise ConfigError("no command given", hint="usage: capsa exec [options] -- CMD [ARGS...]")
    return asyncio.run(_run(sandbox_from_args(args), command, args))


def add_image_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--image",
        metavar="NAME|FILE",
        help="run in this image: a name from `capsa image import/build --name`, a .toml recipe, "
        "or a `docker save` / OCI archive or layout (default: capsa's Debian image)",
    )


def image_from_args(args: argparse.Namespace) -> capsa.Image | None:
    """``--image``, resolved and built now (with per-step progress), so the boot finds it cached."""
    ref = getattr(args, "image", None)
    if ref is None:
        return None
    image = resolve_image(ref)
    with build_steps() as steps:
        image.build(progress=steps)
    return image


def sandbox_from_args(args: argparse.Namespace) -> capsa.SandboxBuilder:
    """The sandbox ``exec`` and ``shell`` boot: --cpus, --memory, --share, --image and the network
    flags."""
    builder = capsa.sandbox().cpus(args.cpus).memory_mb(parse_memory(args.memory))
    image = image_from_args(args)
    if image is not None:
        builder = builder.image(image)
    for item in args.share:
        host, guest, mode = parse_share(item)
        builder = builder.share(host, guest, mode)
    lifetime = getattr(args, "lifetime", None)
    if lifetime is not None:
        builder = builder.lifetime(lifetime)
    network = network_from_args(args)
    return builder if network is None else builder.network(network)


async def _run(builder: capsa.SandboxBuilder, command: list[str], args: argparse.Namespace) -> int:
    async with await builder.build() as vm:
        try:
            return await _command(vm, command, args)
        except VMNotRunning as exc:
            if not vm.lifetime_expired:
                raise
            sys.stderr.write(f"capsa: {exc.message}\n")  # --lifetime ran out: like a timeout
            return TIMEOUT_EXIT


async def _command(vm: capsa.Sandbox, command: list[str], args: argparse.Namespace) -> int:
    spec = vm.agent.exec(command[0]).args(command[1:])
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--env takes K=V, got {item!r}")
        spec = spec.env(key, value)
    if args.cwd:
        spec = spec.cwd(args.cwd)
    process = await spec.spawn()
    background = TaskSet(log)  # stdin: its failures are logged, never lost
    background.spawn(_copy_in(process), name="capsa-exec-stdin")
    output = asyncio.gather(  # awaited below: its errors are raised
        _copy_out(process.stdout, sys.stdout.buffer),
        _copy_out(process.stderr, sys.stderr.buffer),
    )
    try:
        async with asyncio.timeout(args.timeout):
            await output
            return await process.wait()
    except TimeoutError:
        await process.kill()
        sys.stderr.write(f"capsa: {command[0]} timed out after {args.timeout}s and was killed\n")
        return TIMEOUT_EXIT
    finally:
        output.cancel()
        background.cancel()


async def _copy_out(stream: capsa.OutputStream, out: BinaryIO) -> None:
    async for chunk in stream:
        out.write(chunk)
        out.flush()


async def _copy_in(process: capsa.Process) -> None:
    """Forward piped stdin (not a terminal: ``capsa shell`` is the interactive command)."""
    if sys.stdin is None or sys.stdin.isatty():
        await process.close_stdin()
        return
    queue = stdin_chunks("capsa-stdin")
    try:
        while chunk := await queue.get():
            await process.write_stdin(chunk)
        await process.close_stdin()
    except (AgentError, VMNotRunning):
        pass  # the command exited without reading all of its input (or the sandbox is gone)
