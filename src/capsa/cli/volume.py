"""``capsa volume``: create, list, remove volumes, and copy files in and out of them."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from capsa.errors import ConfigError
from capsa.sandbox.volume_files import VolumeFiles
from capsa.volume.store import DEFAULT_SIZE_MB, VolumeStore

_COPY_HELP = "one side is NAME:/path in the volume, the other a host path; directories are copied whole"


def register(commands: Any) -> None:
    parser = commands.add_parser("volume", help="named persistent filesystems for sandboxes")
    parser.add_argument(
        "--dir", type=Path, help="the volume store (default $XDG_DATA_HOME/capsa/volumes)"
    )
    sub = parser.add_subparsers(dest="volume_command", required=True)
    create = sub.add_parser("create", help="create an empty volume (an ext4 filesystem)")
    create.add_argument("name")
    create.add_argument("--size-mb", type=int, default=DEFAULT_SIZE_MB, help="size (default 1024)")
    create.set_defaults(handler=_create)
    listing = sub.add_parser("ls", help="list volumes")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.set_defaults(handler=_list)
    remove = sub.add_parser("rm", help="delete a volume and its content (refused while mounted)")
    remove.add_argument("names", nargs="+")
    remove.set_defaults(handler=_remove)
    copy = sub.add_parser("cp", help="copy files into or out of a volume", description=_COPY_HELP)
    copy.add_argument("source")
    copy.add_argument("target")
    copy.set_defaults(handler=_copy)


def _store(args: argparse.Namespace) -> VolumeStore:
    return VolumeStore(args.dir)


def _create(args: argparse.Namespace) -> int:
    try:
        volume = _store(args).create(args.name, args.size_mb)
    except FileExistsError:
        sys.stderr.write(f"capsa: volume {args.name} already exists\n")
        return 1
    sys.stdout.write(f"{volume.name}\t{volume.size_mb} MiB\t{volume.path}\n")
    return 0


def _list(args: argparse.Namespace) -> int:
    for volume in _store(args).list():
        row = {"name": volume.name, "size_mb": volume.size_mb, "path": str(volume.path)}
        line = json.dumps(row) if args.json else f"{volume.name}\t{volume.size_mb} MiB\t{volume.path}"
        sys.stdout.write(line + "\n")
    return 0


def _remove(args: argparse.Namespace) -> int:
    for name in args.names:
        _store(args).remove(name)
    return 0


def _split(spec: str) -> tuple[str, str] | None:
    """``NAME:/path`` → (NAME, /path); a host path (``./a:b``, ``/x``) → None."""
    name, sep, path = spec.partition(":")
    if not sep or "/" in name or not name:
        return None
    return name, path or "/"


def _copy(args: argparse.Namespace) -> int:
    source, target = _split(args.source), _split(args.target)
    if (source is None) == (target is None):
        raise ConfigError("volume cp: exactly one side must be NAME:/path", hint=_COPY_HELP)
    store = _store(args)
    if target is not None:
        volume = store.open(target[0])
        host = Path(args.source)
        if not host.exists():
            raise ConfigError(f"volume cp: {host} not found")
        return asyncio.run(_copy_in(VolumeFiles(volume), host, target[1], host.is_file()))
    assert source is not None
    volume = store.open(source[0])
    return asyncio.run(_copy_out(VolumeFiles(volume), source[1], Path(args.target)))


async def _copy_in(files: VolumeFiles, host: Path, path: str, is_file: bool) -> int:
    async with files:
        if is_file:
            if path.endswith("/"):
                path += host.name
            await files.write(path, host.read_bytes(), force=True)  # noqa: ASYNC240 - CLI, one file at a time
            return 0
        base = path.rstrip("/") or ""
        if base:
            await files.make_dir(base, force=True)
        for directory, dirs, names in os.walk(host):
            relative = Path(directory).relative_to(host).as_posix()
            prefix = base if relative == "." else f"{base}/{relative}"
            for sub in dirs:
                await files.make_dir(f"{prefix}/{sub}", force=True)
            for name in names:
                local = Path(directory) / name
                if local.is_file() and not local.is_symlink():
                    await files.write(f"{prefix}/{name}", local.read_bytes(), force=True)
    return 0


async def _copy_out(files: VolumeFiles, path: str, host: Path) -> int:
    async with files:
        entry = await files.stat(path)
        if entry["type"] == "file":
            local = host / entry["name"] if host.is_dir() else host  # noqa: ASYNC240
            local.write_bytes(await files.read(path))
            return 0
        if entry["type"] != "directory":
            raise ConfigError(f"volume cp: {path} is a {entry['type']}, not a file or directory")
        host.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240
        root = entry["path"].rstrip("/")
        for item in await files.list(path, depth=32):
            relative = item["path"][len(root) :].lstrip("/")
            local = host / relative
            if item["type"] == "directory":
                local.mkdir(parents=True, exist_ok=True)
            elif item["type"] == "file":
                local.parent.mkdir(parents=True, exist_ok=True)
                local.write_bytes(await files.read(item["path"]))
    return 0
