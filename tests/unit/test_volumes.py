"""Volumes without a VM: names, the store (create, open, size, list, remove, locks, partial files),
their disks on QEMU's command line and in snapshot records, and the CLI's argument parsing."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

import capsa
from capsa.cli.volume import _split
from capsa.snapshot.store import Snapshot, config_record, volume_identities
from capsa.vm.argv import LaunchPlan, build_argv
from capsa.vm.config import DiskSpec
from capsa.volume import VolumeStore, check_name
from capsa.volume.lock import lock_volume


@pytest.mark.parametrize("name", ["a", "data-1", "My_vol.2", "x" * 64])
def test_good_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", ".hidden", "a..b", "a\0b", "x" * 65,
                                  "-lead", "sp ace", "é", 7, None])  # fmt: skip
def test_bad_names(name: object) -> None:
    with pytest.raises(capsa.VolumeError, match="invalid volume name"):
        check_name(name)


def test_create_open_list_remove(tmp_path: Path) -> None:
    vol = capsa.volume("v1", size_mb=16, root=tmp_path)
    assert vol.path == tmp_path / "v1.ext4" and vol.size_mb == 16
    assert vol.path.stat().st_blocks * 512 >= 16 << 20  # preallocated
    assert vol.path.read_bytes()[1024 + 56 : 1024 + 58] == b"\x53\xef"  # the ext4 magic
    assert capsa.volume("v1", root=tmp_path) == vol  # opened, not recreated
    with pytest.raises(capsa.VolumeError, match="exists with 16 MiB"):
        capsa.volume("v1", size_mb=32, root=tmp_path)
    with pytest.raises(FileExistsError):
        VolumeStore(tmp_path).create("v1", 16)
    assert [v.name for v in VolumeStore(tmp_path).list()] == ["v1"]
    VolumeStore(tmp_path).remove("v1")
    assert VolumeStore(tmp_path).list() == []
    with pytest.raises(capsa.VolumeError, match="does not exist"):
        VolumeStore(tmp_path).open("v1")


@pytest.mark.parametrize("size", [0, 15, 1 << 21, True, 1.5])
def test_sizes_are_bounded(tmp_path: Path, size: object) -> None:
    with pytest.raises(capsa.VolumeError, match="size_mb"):
        capsa.volume("v", size_mb=size, root=tmp_path)  # type: ignore[arg-type]


def test_root_directory_is_world_writable(tmp_path: Path) -> None:
    vol = capsa.volume("perm", size_mb=16, root=tmp_path)
    out = subprocess.run(
        ["debugfs", "-R", "stat /", str(vol.path)], check=True, capture_output=True, text=True
    )
    assert "Mode:  01777" in out.stdout


def test_locks_one_writer_or_many_readers(tmp_path: Path) -> None:
    vol = capsa.volume("locked", size_mb=16, root=tmp_path)
    reader1 = lock_volume(vol.path, exclusive=False, name="locked")
    reader2 = lock_volume(vol.path, exclusive=False, name="locked")
    with pytest.raises(capsa.VolumeError, match=r"mounted read-write|mounted by"):
        lock_volume(vol.path, exclusive=True, name="locked")
    with pytest.raises(capsa.VolumeError, match="mounted"):
        VolumeStore(tmp_path).remove("locked")
    os.close(reader1)
    os.close(reader2)
    writer = lock_volume(vol.path, exclusive=True, name="locked")
    with pytest.raises(capsa.VolumeError):
        lock_volume(vol.path, exclusive=False, name="locked")
    os.close(writer)
    VolumeStore(tmp_path).remove("locked")


def test_dead_partial_files_are_swept(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    partial = tmp_path / f".x.partial-{dead.pid}"
    partial.write_bytes(b"half")
    capsa.volume("y", size_mb=16, root=tmp_path)
    assert not partial.exists()


def test_volume_disks_on_the_command_line(tmp_path: Path) -> None:
    vol = capsa.volume("argv", size_mb=16, root=tmp_path)
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"\0" * 0x202 + b"HdrS" + b"\0" * 100)
    config = capsa.vm(capsa.LinuxDirectBoot(kernel)).volume(vol).volume(vol, read_only=True).config
    assert [d.serial for d in config.disks] == ["capsa-vol-0", "capsa-vol-1"]
    plan = LaunchPlan(qemu="/q", accelerator="tcg", console_fd=7, qmp_fd=8)
    argv = build_argv(config, plan)
    drives = [argv[i + 1] for i, a in enumerate(argv) if a == "-drive"]
    devices = [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]
    assert all("werror=report,rerror=report" in d for d in drives)
    assert "readonly=off" in drives[0] and "readonly=on" in drives[1]
    assert "virtio-blk-device,drive=disk0,serial=capsa-vol-0" in devices


def test_snapshot_records_keep_volumes_out_of_the_file_identities(tmp_path: Path) -> None:
    vol = capsa.volume("rec", size_mb=16, root=tmp_path)
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"\0" * 0x202 + b"HdrS" + b"\0" * 100)
    other = tmp_path / "plain.img"
    other.write_bytes(b"\0" * 4096)
    config = capsa.vm(capsa.LinuxDirectBoot(kernel)).disk(other).volume(vol).config
    record = config_record(config, str(kernel), "tcg")
    assert str(vol.path.resolve()) not in [f[0] for f in record["files"]]
    assert record["disks"][0] == [str(other), False, "raw"]  # an older record's shape, unchanged
    assert record["disks"][1] == [str(vol.path), False, "raw", "capsa-vol-0"]
    restored = Snapshot(tmp_path, record).vm_config()
    assert restored.disks[1] == DiskSpec(vol.path, False, "raw", "capsa-vol-0", volume=True)
    assert volume_identities(config)[0][0] == str(vol.path.resolve())


def test_cp_arguments() -> None:
    assert _split("vol:/a/b") == ("vol", "/a/b")
    assert _split("vol:") == ("vol", "/")
    assert _split("./dir:x") is None and _split("/abs") is None and _split("plain") is None


def test_a_pool_refuses_read_write_volumes(tmp_path: Path) -> None:
    vol = capsa.volume("pooled", size_mb=16, root=tmp_path)
    with pytest.raises(capsa.ConfigError, match="read-write volume"):
        capsa.Pool(capsa.sandbox().volume(vol, "/data"), 2)


def test_builder_refuses_bad_mounts(tmp_path: Path) -> None:
    vol = capsa.volume("mounts", size_mb=16, root=tmp_path)
    for path in ["relative", "/", "/a/../b", "/a\0b"]:
        with pytest.raises(capsa.VolumeError):
            capsa.sandbox().volume(vol, path)
    with pytest.raises(capsa.VolumeError, match="twice"):
        capsa.sandbox().volume(vol, "/a").volume(vol, "/b")
    with pytest.raises(capsa.VolumeError, match="share already uses"):
        capsa.sandbox().share(tmp_path, "/a").volume(vol, "/a")
