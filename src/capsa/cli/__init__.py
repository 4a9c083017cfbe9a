"""The ``capsa`` command line: a thin layer over the public API."""

from __future__ import annotations

import argparse
import logging
import sys

from capsa.cli import doctor, exec, image, kernel, mcp, run, serve, shell, volume
from capsa.errors import CapsaError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="capsa",
        description="Run untrusted code in lightweight Linux VMs.",
        epilog="examples:\n  capsa exec -- uname -a\n  capsa doctor\n  capsa image build",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what capsa does")
    commands = parser.add_subparsers(dest="command", required=True)
    exec.register(commands)
    run.register(commands)
    shell.register(commands)
    doctor.register(commands)
    image.register(commands)
    kernel.register(commands)
    serve.register(commands)
    mcp.register(commands)
    volume.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING)
    try:
        code: int = args.handler(args)
    except CapsaError as exc:
        sys.stderr.write(f"capsa: {exc}\n")
        return 2
    except KeyboardInterrupt:
        return 130
    return code
