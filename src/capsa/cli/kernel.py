"""``capsa kernel``: build capsa's own guest kernel from Debian's kernel source."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from rich.console import Console

from capsa.cli._output import emit
from capsa.image.kernel import build_kernel, built_kernel


def register(commands: Any) -> None:
    parser = commands.add_parser("kernel", help="build capsa's fast guest kernel")
    sub = parser.add_subparsers(dest="kernel_command", required=True)
    build = sub.add_parser(
        "build",
        help="build the kernel from linux-source-6.1 (a few minutes; cached)",
        description=(
            "Build capsa's minimal guest kernel from Debian's linux-source-6.1 and the config "
            "fragment shipped with capsa. Cached by source version and config; sandboxes use it "
            "once built (otherwise they boot the stock Debian kernel)."
        ),
    )
    build.add_argument("--rebuild", action="store_true", help="build again even if cached")
    build.add_argument("--json", action="store_true", help="print the result as JSON")
    build.set_defaults(handler=_build)
    show = sub.add_parser("path", help="print the built kernel's files (exit 1 if not built)")
    show.add_argument("--json", action="store_true", help="print the result as JSON")
    show.set_defaults(handler=_path)


def _build(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    if console.is_terminal:
        with console.status("checking the kernel cache") as status:
            kernel = build_kernel(status.update, rebuild=args.rebuild)
    else:  # a log (setup in CI): one line per step and per progress report
        kernel = build_kernel(console.print, rebuild=args.rebuild)
    emit(
        {
            "bzimage": str(kernel.bzimage),
            "vmlinux": str(kernel.vmlinux),
            "release": kernel.release,
            "source": kernel.source_version,
            "log": str(kernel.directory / "build.log"),
        },
        args.json,
    )
    return 0


def _path(args: argparse.Namespace) -> int:
    kernel = built_kernel()
    if kernel is None:
        sys.stderr.write("capsa: the kernel is not built (run: capsa kernel build)\n")
        return 1
    emit({"bzimage": str(kernel.bzimage), "vmlinux": str(kernel.vmlinux)}, args.json)
    return 0
