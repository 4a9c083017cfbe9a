"""Snapshots on disk: a directory with the guest's RAM, QEMU's device state and what it takes to
restore them.

``<dir>/memory`` is the guest RAM as a raw, sparse image (the sandbox's writable layer is tmpfs, so
RAM is the whole guest); restores map it copy-on-write, so clones of one snapshot share its pages.
``<dir>/state`` is the migration stream without RAM (``x-ignore-shared``). ``<dir>/snapshot.json``
records the VM configuration and the identity of everything the state depends on: the QEMU binary,
the kernel, initramfs and root filesystem (size and modification time), the accelerator. A restore
checks all of it first and refuses with :class:`SnapshotError` instead of starting a VM that would
crash or, worse, half-work.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capsa._paths import write_atomic
from capsa.errors import SnapshotError
from capsa.net.gateway import VirtualNetwork
from capsa.shares.spec import ShareSpec
from capsa.vm.config import GUEST_DEFAULTS, DiskSpec, MemoryFile, VMConfig

FORMAT = 2  # 1 had RAM inside the state stream
STATE = "state"
MEMORY = "memory"
META = "snapshot.json"


def file_identity(path: Path) -> list[Any]:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def config_record(config: VMConfig, qemu: str, accelerator: str) -> dict[str, Any]:
    """Everything a restore must reproduce exactly, as plain JSON data."""
    boot = config.boot
    files = [getattr(boot, "kernel", None), getattr(boot, "initrd", None)]
    files += [d.path for d in config.all_disks() if not d.volume]  # a volume's content changes
    return {
        "boot": {
            "kernel": str(getattr(boot, "kernel", "")),
            "initrd": str(getattr(boot, "initrd", "") or ""),
            "root_disk": str(getattr(boot, "root_disk", "") or ""),
            "root_disk_read_only": bool(getattr(boot, "root_disk_read_only", False)),
        },
        "cpus": config.cpus,
        "memory_mb": config.memory_mb,
        "cmdline": [list(item) for item in config.cmdline],
        "cmdline_override": config.cmdline_override,
        "disks": [_disk_record(d) for d in config.disks],
        "machine": config.machine,
        "guest_defaults": GUEST_DEFAULTS,  # the launch defaults a template was booted with
        "pit": config.pit,  # a device in the migration stream: a restore must have it or not alike
        "virtio_ports": list(config.virtio_ports),
        "extra_qemu_args": list(config.extra_qemu_args),
        "accelerator": accelerator,
        # Share slots, not paths: a restore may plug other host directories into the same devices.
        "share_slots": [share.mechanism for share in config.shares],
        # The guest's address is in its memory: a restore needs a network with the same subnet.
        "network": config.network.gateway.subnet if config.network is not None else None,
        "qemu": file_identity(Path(qemu)),
        "files": [file_identity(Path(f)) for f in files if f],
    }


def _disk_record(disk: DiskSpec) -> list[Any]:
    """``[path, read_only, format]``, plus ``serial`` for a volume (older records stay as they were)."""
    record: list[Any] = [str(disk.path), disk.read_only, disk.format]
    return [*record, disk.serial or ""] if disk.volume else record


def _disk_spec(record: list[Any]) -> DiskSpec:
    if len(record) == 4:
        path, read_only, fmt, serial = record
        return DiskSpec(Path(path), read_only, fmt, serial or None, volume=True)
    path, read_only, fmt = record
    return DiskSpec(Path(path), read_only, fmt)


def volume_identities(config: VMConfig) -> list[list[Any]]:
    """The identity (path, size, mtime) of each volume disk at the moment of a snapshot: a restore
    checks the volume was not written since (the restored kernel caches its filesystem)."""
    return [file_identity(d.path) for d in config.disks if d.volume]


def config_key(record: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:20]


@dataclass(frozen=True)
class Snapshot:
    """A snapshot directory. Restore it with ``capsa.sandbox().from_snapshot(snapshot)``."""

    path: Path
    record: dict[str, Any]
    hostname: str = "capsa"

    @property
    def state(self) -> Path:
        return self.path / STATE

    @property
    def memory(self) -> Path:
        return self.path / MEMORY

    @property
    def key(self) -> str:
        return config_key(self.record)

    def vm_config(
        self, shares: tuple[ShareSpec, ...] = (), network: VirtualNetwork | None = None
    ) -> VMConfig:
        """The configuration to restore with (it must equal the one saved). ``shares`` fill the
        snapshot's share slots (same count and mechanism; the host directories may differ)."""
        slots = self.record.get("share_slots", [])
        if [share.mechanism for share in shares] != slots:
            raise SnapshotError(
                f"the snapshot {self.path} has share slots {slots}, the restore asks for "
                f"{[share.mechanism for share in shares]}",
                path=self.path,
                hint="restore with as many 9p shares as the snapshot was taken with",
            )
        from capsa.boot import LinuxDirectBoot  # noqa: PLC0415 - boot imports nothing heavy; avoids a cycle

        boot = self.record["boot"]
        linux = LinuxDirectBoot(boot["kernel"], boot["initrd"] or None)
        if boot["root_disk"]:
            linux = linux.with_root_disk(boot["root_disk"], read_only=boot["root_disk_read_only"])
        return VMConfig(
            boot=linux,
            cpus=self.record["cpus"],
            memory_mb=self.record["memory_mb"],
            cmdline=tuple((k, v) for k, v in self.record["cmdline"]),
            cmdline_override=self.record["cmdline_override"],
            disks=tuple(_disk_spec(d) for d in self.record["disks"]),
            accelerator=self.record["accelerator"],
            machine=self.record["machine"],
            pit=self.record.get("pit", True),  # snapshots taken before the key existed had a PIT
            virtio_ports=tuple(self.record["virtio_ports"]),
            extra_qemu_args=tuple(self.record["extra_qemu_args"]),
            shares=shares,
            network=self._network(network),
            memory_file=MemoryFile(self.memory, shared=False),
        )

    def _network(self, network: VirtualNetwork | None) -> VirtualNetwork | None:
        saved = self.record.get("network")
        wanted = network.gateway.subnet if network is not None else None
        if saved != wanted:
            raise SnapshotError(
                f"the snapshot {self.path} was taken with network {saved!r}, the restore asks for "
                f"{wanted!r}",
                path=self.path,
                hint="restore with the same network subnet (the policy may differ)",
            )
        return network


def write_metadata(directory: Path, record: dict[str, Any]) -> None:
    meta = {"format": FORMAT, "record": record}
    write_atomic(directory / META, json.dumps(meta, indent=1, sort_keys=True) + "\n")


def load_snapshot(path: str | Path | Snapshot) -> Snapshot:
    """Read and check a snapshot directory (not yet against the host: see :func:`check_compatible`)."""
    if isinstance(path, Snapshot):
        path = path.path
    directory = Path(path).expanduser()
    try:
        meta = json.loads((directory / META).read_text())
    except FileNotFoundError:
        raise SnapshotError(f"no snapshot at {directory} (missing {META})", path=directory) from None
    except (OSError, ValueError) as exc:
        raise SnapshotError(
            f"unreadable snapshot metadata in {directory}: {exc}", path=directory
        ) from None
    if (
        not isinstance(meta, dict)
        or meta.get("format") != FORMAT
        or not isinstance(meta.get("record"), dict)
    ):
        raise SnapshotError(f"{directory} is not a capsa snapshot of format {FORMAT}", path=directory)
    state = directory / STATE
    if not state.is_file() or state.stat().st_size == 0:
        raise SnapshotError(f"the snapshot in {directory} has no state file", path=directory)
    memory = directory / MEMORY
    megabytes = meta["record"].get("memory_mb")
    size = megabytes << 20 if isinstance(megabytes, int) else -1
    if not memory.is_file() or memory.stat().st_size != size:
        raise SnapshotError(
            f"the snapshot in {directory} has no memory image of {megabytes} MiB", path=directory
        )
    return Snapshot(directory, meta["record"])


def check_compatible(snapshot: Snapshot, qemu: str) -> None:
    """Refuse a snapshot whose QEMU binary or guest files changed since it was taken."""
    record = snapshot.record
    try:
        if record["qemu"] != file_identity(Path(qemu)):
            raise SnapshotError(
                f"the snapshot {snapshot.path} was taken with another QEMU build",
                path=snapshot.path,
                hint="snapshots only restore with the exact QEMU that saved them; take a new one",
            )
        for saved in record["files"]:
            now = Path(saved[0])
            if not now.exists() or file_identity(now) != saved:
                raise SnapshotError(
                    f"{saved[0]} changed since the snapshot {snapshot.path} was taken",
                    path=snapshot.path,
                    hint="the guest image was rebuilt; take a new snapshot",
                )
        for saved in record.get("volumes", []):
            now = Path(saved[0])
            if not now.exists() or file_identity(now) != saved:
                raise SnapshotError(
                    f"the volume {now.name.removesuffix('.ext4')} was written since the snapshot "
                    f"{snapshot.path} was taken; restoring it would corrupt the volume",
                    path=snapshot.path,
                    hint="a snapshot of a sandbox with a volume restores only while the volume is "
                    "as it left it: pause with snapshot(..., resume=False), or snapshot without "
                    "the volume (docs/volumes.md)",
                )
    except (KeyError, TypeError, IndexError, OSError) as exc:
        raise SnapshotError(
            f"malformed snapshot metadata in {snapshot.path}: {exc!r}", path=snapshot.path
        ) from None


def remove_snapshot(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def new_partial_dir(target: Path) -> Path:
    """A sibling directory to build a snapshot in; renamed onto ``target`` only when complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    return partial
