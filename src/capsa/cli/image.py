"""``capsa image``: fetch and locate guest images."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from capsa.image import busybox_guest


def register(commands: Any) -> None:
    parser = commands.add_parser("image", help="fetch and locate guest images")
    sub = parser.add_subparsers(dest="image_command", required=True)
    busybox = sub.add_parser(
        "busybox", help="fetch the Debian kernel and build the busybox raw-VM guest; print paths"
    )
    busybox.add_argument("--flavour", default="cloud-amd64", help="Debian kernel flavour")
    busybox.add_argument("--json", action="store_true", help="machine-readable output")
    busybox.set_defaults(handler=_busybox)


def _busybox(args: argparse.Namespace) -> int:
    guest = busybox_guest(args.flavour)
    if args.json:
        data = {
            "kernel": str(guest.kernel),
            "initrd": str(guest.initrd),
            "version": guest.kernel_version,
        }
        sys.stdout.write(json.dumps(data) + "\n")
    else:
        sys.stdout.write(f"kernel  {guest.kernel}\ninitrd  {guest.initrd}\n")
    return 0
