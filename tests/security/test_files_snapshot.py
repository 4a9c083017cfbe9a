"""Attacks on filesystem snapshots (``capsa.sandbox.files_snapshot``): the guest, root in its VM,
writes the archive of its files that the host keeps. It tries to make the host keep names outside
the root, read or hold more than it wrote, keep device nodes or overlayfs's own attributes, or fill
the host's disk. Everything but the last test runs on the host without a VM."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from capsa.errors import SnapshotError
from capsa.sandbox import files_snapshot as files
from tests.conftest import SandboxFactory


def _capture(tmp_path: Path, entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    raw = tmp_path / "capture.tar"
    with tarfile.open(raw, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return raw


def _info(name: str, kind: bytes = tarfile.REGTYPE, size: int = 0, **extra: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, size
    for key, value in extra.items():
        setattr(info, key, value)
    return info


def _rewrite(tmp_path: Path, raw: Path) -> files.FilesSnapshot:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    return files._rewrite(raw, out)


@pytest.mark.parametrize(
    "entry",
    [
        _info("./home/../../etc/shadow", size=3),
        _info("home/user/hard", tarfile.LNKTYPE, linkname="../../etc/shadow"),
    ],
)
def test_names_and_hard_links_out_of_the_root_are_refused(
    tmp_path: Path, entry: tarfile.TarInfo
) -> None:
    raw = _capture(tmp_path, [(entry, b"abc" if entry.size else None)])
    with pytest.raises(SnapshotError, match="outside the root"):
        _rewrite(tmp_path, raw)


def test_a_size_larger_than_what_was_written_is_refused_before_reading(tmp_path: Path) -> None:
    raw = _capture(tmp_path, [(_info("home/user/f", size=4), b"abcd")])
    data = bytearray(raw.read_bytes())
    data[124:136] = b"%011o\0" % (1 << 32)  # the header now claims 4 GiB of data
    checksum = sum(data[:148]) + 8 * 32 + sum(data[156:512])
    data[148:156] = b"%06o\0 " % checksum
    raw.write_bytes(bytes(data))
    with pytest.raises(Exception, match="more than the guest wrote"):
        _rewrite(tmp_path, raw)


def test_devices_overlay_attributes_and_capsa_files_are_not_kept(tmp_path: Path) -> None:
    marked = _info("home/user/f", size=2)
    marked.pax_headers = {
        "SCHILY.xattr.trusted.overlay.redirect": "/etc",
        "SCHILY.xattr.security.selinux": "x",
        "SCHILY.xattr.user.kept": "v",
    }
    raw = _capture(
        tmp_path,
        [
            (_info("dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=0), None),
            (_info("home/user/mem", tarfile.CHRTYPE, devmajor=1, devminor=1), None),
            (_info("usr/lib/capsa/capsa-agent", size=2), b"#!"),
            (_info("run/capsa/rw/x", size=1), b"x"),
            (_info("home/user/ln", tarfile.LNKTYPE, linkname="usr/lib/capsa/capsa-agent"), None),
            (marked, b"ok"),
        ],
    )
    snap = _rewrite(tmp_path, raw)
    with tarfile.open(snap.path / files.ARCHIVE) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == ["home/user/f"]
    assert {k for k in members[0].pax_headers if k.startswith("SCHILY")} == {"SCHILY.xattr.user.kept"}
    assert snap.removed == ()


@pytest.mark.vm
@pytest.mark.asyncio
async def test_a_guest_that_writes_without_end_fills_no_disk(
    tmp_path: Path, sandbox_factory: SandboxFactory
) -> None:
    vm = await sandbox_factory()
    fake = "#!/bin/sh\nexec cat /dev/zero\n"
    await vm.agent.write_file("/usr/local/bin/tar", fake.encode(), mode=0o755)
    with pytest.raises(SnapshotError, match="more than 4194304 bytes"):
        await files.save_files(vm, tmp_path / "fs", max_bytes=4 << 20, timeout=120)
    assert not (tmp_path / "fs").exists()
    assert (await vm.agent.exec("true").run()).exit_code == 0  # the guest and its agent go on
