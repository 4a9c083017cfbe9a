"""``capsa image``: build and locate guest images."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from rich.console import Console

from capsa.image import busybox_guest
from capsa.image.sandbox import sandbox_image


def register(commands: Any) -> None:
    parser = commands.add_parser("image", help="build and locate guest images")
    sub = parser.add_subparsers(dest="image_command", required=True)
    build = sub.add_parser(
        "build", help="build the default sandbox image (Debian kernel, initramfs, rootfs); cached"
    )
    build.add_argument("--json", action="store_true", help="print the image paths as JSON")
    build.add_argument("--rebuild", action="store_true", help="build again even if cached")
    build.set_defaults(handler=_build)
    busybox = sub.add_parser(
        "busybox", help="fetch the Debian kernel and build the busybox raw-VM guest; print paths"
    )
    busybox.add_argument("--flavour", default="cloud-amd64", help="Debian kernel flavour")
    busybox.add_argument("--json", action="store_true", help="machine-readable output")
    busybox.set_defaults(handler=_busybox)


def _emit(data: dict[str, str], as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(data) + "\n")
    else:
        sys.stdout.write("".join(f"{key:8}{value}\n" for key, value in data.items()))


def _build(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    with console.status("checking the image cache") as status:
        image = sandbox_image(rebuild=args.rebuild, progress=status.update)
    data = {
        "kernel": str(image.kernel),
        "initrd": str(image.initrd),
        "rootfs": str(image.rootfs),
        "version": image.kernel_version,
    }
    _emit(data, args.json)
    return 0


def _busybox(args: argparse.Namespace) -> int:
    guest = busybox_guest(args.flavour)
    data = {"kernel": str(guest.kernel), "initrd": str(guest.initrd), "version": guest.kernel_version}
    _emit(data, args.json)
    return 0
