"""The server's volume holds without a VM: a hold is written beside the volume and read back by the
next server (a sandbox paused across a restart keeps its volumes), and lapses once its sandbox is
gone; the script that serves a mounted volume's content is the helper's walker, spliced whole."""

from __future__ import annotations

from pathlib import Path

import pytest

from capsa.server.entry import ApiError
from capsa.server.volume_mounted import MOUNTED_SCRIPT
from capsa.server.volumes import ServerVolumes


@pytest.mark.asyncio
async def test_a_hold_survives_a_restart_while_its_sandbox_lives(tmp_path: Path) -> None:
    alive: set[str] = {"sbx-1"}
    first = ServerVolumes(tmp_path, 16, alive.__contains__)
    record = first.create("t1", "data")
    async with first.mounting([(record, "/data")]) as hold:
        hold("sbx-1")
    assert (tmp_path / "t1" / "data.holder").is_file()

    second = ServerVolumes(tmp_path, 16, alive.__contains__)  # the next start
    second.load()
    kept = second.find_by_name("t1", "data")
    assert second.holder(kept) == "sbx-1"
    assert second.mounts_json("sbx-1") == [{"name": "data", "path": "/data"}]
    with pytest.raises(ApiError) as refused:
        await second.destroy(kept)
    assert refused.value.status == 409
    with pytest.raises(ApiError) as paused:  # no running VM: its content calls wait for its resume
        async with second.files(kept):
            pass
    assert paused.value.status == 409

    alive.clear()  # killed (or ended by a crash): the hold lapses, and its record goes
    assert second.holder(kept) is None
    await second.destroy(kept)
    assert not (tmp_path / "t1" / "data.holder").exists()
    assert not (tmp_path / "t1" / "data.ext4").exists()


def test_an_unreadable_hold_record_is_dropped(tmp_path: Path) -> None:
    volumes = ServerVolumes(tmp_path, 16, lambda _: True)
    record = volumes.create("t1", "v")
    (tmp_path / "t1" / "v.holder").write_text("{not json")
    again = ServerVolumes(tmp_path, 16, lambda _: True)
    again.load()
    assert again.holder(again.find(record.id, None)) is None
    assert not (tmp_path / "t1" / "v.holder").exists()


def test_the_mounted_script_is_the_helpers_walker_from_a_checked_root() -> None:
    compile(MOUNTED_SCRIPT, "<mounted volume script>", "exec")
    assert 'ROOT = "/volume"' not in MOUNTED_SCRIPT
    assert "_volume_root(sys.argv[3], sys.argv[4])" in MOUNTED_SCRIPT
    assert MOUNTED_SCRIPT.index("def meta(fd, name, args):\n    f = os.open") > MOUNTED_SCRIPT.index(
        "def meta(fd, name, args):\n    target"
    )  # the descriptor-based meta is defined last: the one main() calls
