"""``capsa image``: build and locate guest images."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from capsa._paths import cache_dir
from capsa.backend.qemu.process import find_qemu
from capsa.cli._output import emit
from capsa.cli._progress import build_steps
from capsa.errors import ConfigError, ImageError, SnapshotError
from capsa.image import busybox_guest
from capsa.image.sandbox import sandbox_image
from capsa.recipes import store
from capsa.sandbox.builder import template_root
from capsa.snapshot.store import check_compatible, load_snapshot, remove_snapshot


def register(commands: Any) -> None:
    parser = commands.add_parser("image", help="build and locate guest images")
    sub = parser.add_subparsers(dest="image_command", required=True)
    build = sub.add_parser(
        "build",
        help="build a TOML recipe (FILE), or with no FILE the default sandbox image; cached",
    )
    build.add_argument("file", nargs="?", metavar="FILE", help="a TOML image recipe")
    build.add_argument("--name", help="with FILE: register the image as NAME (for --image NAME)")
    build.add_argument("--json", action="store_true", help="print the image paths as JSON")
    build.add_argument("--rebuild", action="store_true", help="without FILE: build again")
    build.set_defaults(handler=_build)
    imports = sub.add_parser(
        "import",
        help="import a `docker save` / OCI archive or layout as image NAME (for --image NAME)",
    )
    imports.add_argument("archive", metavar="ARCHIVE", help="archive (.tar) or OCI layout directory")
    imports.add_argument("--name", required=True, help="the name to give the image")
    imports.add_argument("--json", action="store_true", help="machine-readable output")
    imports.set_defaults(handler=_import)
    busybox = sub.add_parser(
        "busybox", help="fetch the Debian kernel and build the busybox raw-VM guest; print paths"
    )
    busybox.add_argument("--flavour", default="cloud-amd64", help="Debian kernel flavour")
    busybox.add_argument("--json", action="store_true", help="machine-readable output")
    busybox.set_defaults(handler=_busybox)
    listing = sub.add_parser(
        "ls", help="list the named images (layers, size, last use), then everything in the cache"
    )
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(handler=_ls)
    path = sub.add_parser("path", help="print the default sandbox image's files (exit 1 if not built)")
    path.add_argument("--json", action="store_true", help="machine-readable output")
    path.set_defaults(handler=_path)
    remove = sub.add_parser(
        "rm",
        help="remove image NAME and its templates; with no NAME the cached sandbox images and "
        "templates (--all: the whole cache)",
    )
    remove.add_argument("name", nargs="?", metavar="NAME", help="a named image")
    remove.add_argument("--all", action="store_true", help="also kernels, test guests, verdicts")
    remove.set_defaults(handler=_rm)
    templates = sub.add_parser(
        "templates",
        help="list the sandbox template snapshots (restored instead of cold boots); prune them",
    )
    templates.add_argument(
        "--prune", action="store_true", help="remove templates that no longer restore"
    )
    templates.add_argument("--all", action="store_true", help="with --prune: remove every template")
    templates.add_argument("--json", action="store_true", help="machine-readable output")
    templates.set_defaults(handler=_templates)


def _build(args: argparse.Namespace) -> int:
    if args.file is not None:
        return _build_recipe(args)
    if args.name is not None:
        raise ConfigError("--name needs a recipe FILE", hint="capsa image build FILE --name NAME")
    console = Console(stderr=True)
    with console.status("checking the image cache") as status:
        image = sandbox_image(rebuild=args.rebuild, progress=status.update)
    data = {
        "kernel": str(image.kernel),
        "initrd": str(image.initrd),
        "rootfs": str(image.rootfs),
        "version": image.kernel_version,
    }
    emit(data, args.json)
    return 0


def _build_recipe(args: argparse.Namespace) -> int:
    path = Path(args.file).expanduser()
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path}")
    image = store.load_recipe_file(path)
    with build_steps() as steps:
        if args.name is not None:
            entry = store.register(args.name, image, kind="recipe", source=path.absolute(),
                                   progress=steps)  # fmt: skip
            emit(_entry_row(entry), args.json)
            return 0
        built = image.build(progress=steps)
    data: dict[str, Any] = {
        "name": built.name,
        "key": built.key,
        "layers": [str(p) for p in built.layers],
    }
    emit(data, args.json)
    return 0


def _import(args: argparse.Namespace) -> int:
    store.check_name(args.name)
    with build_steps() as steps:
        entry = store.import_oci(args.name, args.archive, progress=steps)
    emit(_entry_row(entry), args.json)
    return 0


def _entry_row(entry: store.NamedImage) -> dict[str, Any]:
    return {
        "kind": "named",
        "name": entry.name,
        "from": entry.kind,
        "source": entry.source,
        "layers": len(entry.layers),
        "bytes": entry.size,
        "last_used": entry.last_used,
        "path": entry.directory,
    }


def _ago(when: float | None) -> str:
    if when is None:
        return "never"
    seconds = max(0.0, time.time() - when)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


def _size(path: Path) -> int:
    """Disk usage, not apparent size: a snapshot's memory image is sparse."""
    if path.is_file():
        return path.stat().st_blocks * 512
    return sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def _ls(args: argparse.Namespace) -> int:
    root = cache_dir()
    named = [_entry_row(entry) for entry in store.named_images()]
    rows: list[dict[str, Any]] = []
    for group in ("kernels", "images", "templates", "busybox-guests", "bench"):
        folder = root / group
        for entry in sorted(folder.iterdir()) if folder.exists() else []:
            if entry.name.startswith("."):
                continue
            rows.append({"kind": group, "name": entry.name, "bytes": _size(entry), "path": str(entry)})
    if args.json:
        sys.stdout.write(json.dumps(named + rows) + "\n")
        return 0
    if named:
        sys.stdout.write(f"{'IMAGE':24} {'LAYERS':>6} {'SIZE':>12}  {'LAST USED':12} SOURCE\n")
    for item in named:
        size = f"{int(item['bytes']) / (1 << 20):8.1f} MiB"
        sys.stdout.write(f"{item['name']:24} {item['layers']:>6} {size:>12}  "
                         f"{_ago(item['last_used']):12} {item['source']}\n")  # fmt: skip
    if named:
        sys.stdout.write("\n")
    for row in rows:
        sys.stdout.write(f"{row['kind']:15} {int(row['bytes']) / (1 << 20):8.1f} MiB  {row['name']}\n")
    total = sum(int(r["bytes"]) for r in rows)
    sys.stdout.write(f"{'total':15} {total / (1 << 20):8.1f} MiB  in {root}\n")
    return 0


def _path(args: argparse.Namespace) -> int:
    try:
        image = sandbox_image(build=False)
    except ImageError as exc:
        sys.stderr.write(f"capsa: {exc.message} (run: capsa image build)\n")
        return 1
    data = {"kernel": str(image.kernel), "initrd": str(image.initrd), "rootfs": str(image.rootfs)}
    emit(data, args.json)
    return 0


def _rm(args: argparse.Namespace) -> int:
    if args.name is not None:
        if args.all:
            raise ConfigError("give NAME or --all, not both")
        for path in store.remove(args.name):
            sys.stdout.write(f"removed {path}\n")
        return 0
    root = cache_dir()
    targets = [root] if args.all else [root / "images", root / "templates", root / "bench"]
    for target in targets:
        if target.exists():
            shutil.rmtree(target)
            sys.stdout.write(f"removed {target}\n")
    return 0


def _templates(args: argparse.Namespace) -> int:
    rows = []
    root = template_root()
    qemu = find_qemu()
    for directory in sorted(root.iterdir()) if root.exists() else []:
        if not directory.is_dir() or directory.name.startswith("."):
            continue
        try:
            snapshot = load_snapshot(directory)
            check_compatible(snapshot, qemu)
            usable, why = True, ""
        except SnapshotError as exc:
            usable, why = False, exc.message
        size = _size(directory)
        removed = args.prune and (args.all or not usable)
        if removed:
            remove_snapshot(directory)
        rows.append(
            {"key": directory.name, "bytes": size, "usable": usable, "why": why, "removed": removed}
        )
    if args.json:
        sys.stdout.write(json.dumps(rows) + "\n")
    else:
        for row in rows:
            state = "removed" if row["removed"] else ("ok" if row["usable"] else f"stale: {row['why']}")
            sys.stdout.write(f"{row['key']}  {int(row['bytes']) / (1 << 20):7.1f} MiB  {state}\n")
        if not rows:
            sys.stdout.write(f"no templates in {root}\n")
    return 0


def _busybox(args: argparse.Namespace) -> int:
    guest = busybox_guest(args.flavour)
    data = {"kernel": str(guest.kernel), "initrd": str(guest.initrd), "version": guest.kernel_version}
    emit(data, args.json)
    return 0
