"""Volumes (an ext4 image on virtio-blk) vs a virtio-fs share, side by side in one sandbox.

The operations the issue names: ``ls -l`` of 2,000 files, and a 200 MiB write and read. Each runs
in the guest (timed there), on each target in rotation, ``--runs`` times; the guest's page cache is
dropped before each (but the warm listing) so reads and listings reach the volume or the share.
Prints medians and the ratio share/volume (above 1: the volume is faster).

    .venv/bin/python -m bench.volume [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from pathlib import Path

import capsa
from bench._report import figure, header
from capsa import AccessMode

TARGETS = {"volume": "/mnt/vol", "virtiofs": "/mnt/vfs"}
MIB = 200
FILES = 2000
DROP = "sync; echo 3 > /proc/sys/vm/drop_caches"
OPS = {
    "ls -l 2000 files": (
        f'rm -rf $D/many; mkdir $D/many; i=0; while [ $i -lt {FILES} ]; do echo x > "$D/many/f$i"; '
        f"i=$((i+1)); done; {DROP}",
        "ls -l $D/many > /dev/null",
    ),
    "ls -l again (warm)": ("ls -l $D/many > /dev/null", "ls -l $D/many > /dev/null"),
    "write 200 MiB": (f"rm -f $D/w.bin; {DROP}", f"head -c {MIB}M /dev/zero > $D/w.bin; sync"),
    "read 200 MiB": (DROP, "cat $D/w.bin > /dev/null"),
}


async def timed(vm: capsa.Sandbox, directory: str, setup: str, command: str) -> float:
    script = (
        f'D="{directory}"; {setup}; s=$(date +%s%N); {command}; e=$(date +%s%N); '
        "echo $(( (e - s) / 1000 ))"
    )
    result = await vm.agent.exec("sh").args(["-c", script]).timeout(900).run()
    assert result.exit_code == 0, result.stderr
    return int(result.stdout.split()[-1]) / 1e6


async def main(runs: int) -> None:
    header("volume")
    with tempfile.TemporaryDirectory() as store, tempfile.TemporaryDirectory() as shared:
        vol = capsa.volume("bench", size_mb=512, root=Path(store))
        builder = (
            capsa.sandbox()
            .memory_mb(1024)
            .volume(vol, TARGETS["volume"])
            .share(shared, TARGETS["virtiofs"], AccessMode.READ_WRITE, mechanism="virtiofs")
        )
        async with await builder.build(300) as vm:
            samples: dict[tuple[str, str], list[float]] = {}
            for _ in range(runs):
                for op, (prepare, command) in OPS.items():
                    for target, directory in TARGETS.items():
                        seconds = await timed(vm, directory, prepare, command)
                        samples.setdefault((op, target), []).append(seconds)
    print(f"runs: {runs}; sandbox with 1 vCPU, 1 GiB, capsa kernel; TCG on this host")
    print(f"{'operation':20} {'volume':>12} {'virtio-fs':>12}   virtio-fs/volume")
    for op in OPS:
        med = {t: statistics.median(samples[(op, t)]) for t in TARGETS}
        ratio = med["virtiofs"] / med["volume"]
        print(f"{op:20} {med['volume'] * 1000:10.0f}ms {med['virtiofs'] * 1000:10.0f}ms   {ratio:5.2f}x")
        slug = op.split(" (")[0].replace(" ", "_").replace("-", "") + ("_warm" if "warm" in op else "")
        for target in TARGETS:
            figure(f"volume_{slug}_{target}_ms", med[target] * 1000, "ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    asyncio.run(main(parser.parse_args().runs))
