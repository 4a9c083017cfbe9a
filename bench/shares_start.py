"""Sandboxes with shares: start from a template vs cold, and ``ls -l`` on what ``auto`` picks.

For a read-only and a writable share of a directory of 2,000 files, in one run:

- start: ``build()`` → first exec answered, cold (``.cold()``: ``auto`` is virtio-fs there) vs the
  default builder (``auto`` is 9p, restored from the template; the first build that records the
  template is not counted). Goal: template ≤ 0.15x cold.
- ``ls -l`` of the 2,000 files in the guest, on the template sandbox's share (9p) vs the cold one's
  (virtio-fs): "first" after dropping the guest's caches (the first listing in a fresh sandbox),
  "again" right after (a repeated listing). Goal: ≤ 2x virtio-fs.

    .venv/bin/python -m bench.shares_start [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import capsa
from bench._report import figure, header
from capsa import AccessMode

FILES = 2000
GUEST = "/mnt/share"
DROP = "sync; echo 3 > /proc/sys/vm/drop_caches"
MODES = {"ro": AccessMode.READ_ONLY, "rw": AccessMode.READ_WRITE}


async def start(builder: capsa.SandboxBuilder) -> tuple[float, capsa.Sandbox]:
    began = time.perf_counter()
    vm = await builder.build()
    done = await vm.agent.exec("true").timeout(60).run()
    assert done.exit_code == 0
    return time.perf_counter() - began, vm


async def listing(vm: capsa.Sandbox, drop: bool) -> float:
    script = (
        f"{DROP if drop else ':'}; s=$(date +%s%N); ls -l {GUEST} > /dev/null; e=$(date +%s%N); "
        "echo $(( (e - s) / 1000 ))"
    )
    result = await vm.agent.exec("sh").args(["-c", script]).timeout(600).run()
    assert result.exit_code == 0, result.stderr
    return int(result.stdout.split()[-1]) / 1e6


async def listings(vm: capsa.Sandbox, runs: int) -> tuple[float, float]:
    first = [await listing(vm, True) for _ in range(runs)]
    again = [await listing(vm, False) for _ in range(runs)]
    return statistics.median(first), statistics.median(again)


async def mechanism(vm: capsa.Sandbox) -> str:
    return next(share.mechanism for share in vm.shares if share.guest_path == GUEST)


async def measure(mode: str, directory: str, runs: int) -> dict[str, float | str]:
    builder = capsa.sandbox().memory_mb(512).share(directory, GUEST, MODES[mode])
    cold_times, warm_times = [], []
    out: dict[str, float | str] = {}
    for index in range(runs):
        seconds, vm = await start(builder.cold())
        async with vm:
            cold_times.append(seconds)
            if index == 0:
                out["cold_mechanism"] = await mechanism(vm)
                out["cold_first"], out["cold_again"] = await listings(vm, runs)
    async with await builder.build():  # records the template if there is none yet
        pass
    for index in range(runs):
        seconds, vm = await start(builder)
        async with vm:
            warm_times.append(seconds)
            if index == 0:
                out["auto_mechanism"] = await mechanism(vm)
                out["auto_first"], out["auto_again"] = await listings(vm, runs)
    out["cold"] = statistics.median(cold_times)
    out["template"] = statistics.median(warm_times)
    out["samples"] = (
        f"cold {' '.join(f'{t:.2f}' for t in cold_times)} s; "
        f"template {' '.join(f'{t:.2f}' for t in warm_times)} s"
    )
    return out


async def main(runs: int) -> None:
    header("shares_start")
    results = {}
    with tempfile.TemporaryDirectory() as directory:
        for i in range(FILES):
            (Path(directory) / f"f{i}").write_text("x\n")
        for mode in MODES:
            results[mode] = await measure(mode, directory, runs)
    print(f"runs: {runs}; sandbox with 1 vCPU, 512 MiB, capsa kernel; TCG on this host")
    print(
        f"{'share':5} {'cold':>8} {'template':>9} {'ratio':>6}   "
        f"{'ls -l first (auto / vfs)':>30} {'ls -l again (auto / vfs)':>30}"
    )
    for mode, r in results.items():
        cold, template = float(r["cold"]), float(r["template"])
        ratio = template / cold
        first = float(r["auto_first"]) / float(r["cold_first"])
        again = float(r["auto_again"]) / float(r["cold_again"])
        print(
            f"{mode:5} {cold:7.2f}s {template:8.2f}s {ratio:5.2f}x   "
            f"{float(r['auto_first']) * 1000:7.0f} / {float(r['cold_first']) * 1000:5.0f} ms "
            f"= {first:4.1f}x   "
            f"{float(r['auto_again']) * 1000:7.0f} / {float(r['cold_again']) * 1000:5.0f} ms "
            f"= {again:4.1f}x   ({r['auto_mechanism']} vs {r['cold_mechanism']})"
        )
        print(f"      samples: {r['samples']}")
        figure(f"shares_start_{mode}_template_vs_cold", ratio, "x", "<= 0.15")
        figure(f"shares_start_{mode}_cold_s", cold, "s")
        figure(f"shares_start_{mode}_template_s", template, "s")
        figure(f"shares_start_{mode}_ls_first_vs_virtiofs", first, "x", "<= 2")
        figure(f"shares_start_{mode}_ls_again_vs_virtiofs", again, "x", "<= 2")
    print("goals: template/cold <= 0.15x; ls -l on auto's mechanism <= 2x virtio-fs")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    asyncio.run(main(parser.parse_args().runs))
