"""Run every bench, one after the other, and write all their figures to one JSON file.

Each bench runs as its own process (``python -m bench.<name>``) with ``CAPSA_BENCH_JSON`` pointing
at a temporary file where it leaves its figures (see :mod:`bench._report`); this script merges them
with the machine description (cores, load average, commit) and each bench's printed output into
``--out`` (default ``bench/results/<UTC time>.json``). ``--markdown`` (or ``--table RESULT.json``) prints
the table that ``docs/performance.md`` shows. Compare two runs with ``--compare OLD.json NEW.json``.

    .venv/bin/python -m bench.run_all [--only snapshots,pool_throughput] [--quick]
    .venv/bin/python -m bench.run_all --compare bench/results/A.json bench/results/B.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._report import ROOT, machine

# name -> (arguments, arguments with --quick)
BENCHES: dict[str, tuple[list[str], list[str]]] = {
    "boot_raw": ([], ["--runs", "3"]),
    "kernel_boot": ([], ["--runs", "2"]),
    "sandbox_agent": ([], ["--runs", "3", "--only", "cold,rtt"]),
    "snapshots": ([], ["--runs", "5", "--levels", "4,8"]),
    "pool_throughput": ([], ["--seconds", "20"]),
    "shares": ([], ["--runs", "1"]),
    "shares_start": ([], ["--runs", "2"]),
    "volume": ([], ["--runs", "1"]),
    "network": ([], []),
    "policy": ([], []),
    "uefi_boot": ([], []),
    "clusters": ([], []),
    "server": ([], []),
    "server_js": ([], ["--runs", "5"]),
    "server_fork": ([], ["--runs", "4"]),
    "server_pause": ([], ["--runs", "3"]),
    "ray": ([], ["--runs", "1", "--calls", "50"]),
    "images": ([], ["--only", "oci,start", "--runs", "3"]),
    "density": ([], ["--counts", "20", "--busy", "10", "--window", "10", "--busy-seconds", "10"]),
    "density_server": ([], ["--count", "20", "--window", "10"]),
}
TIMEOUT = 3600


def run_bench(name: str, args: list[str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "figures.json"
        env = {**os.environ, "CAPSA_BENCH_JSON": str(target)}
        started = time.monotonic()
        try:
            done = subprocess.run(
                [sys.executable, "-m", f"bench.{name}", *args],
                check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT,
            )  # fmt: skip
            output, code = done.stdout + done.stderr[-2000:], done.returncode
        except subprocess.TimeoutExpired as exc:
            output, code = f"timed out after {TIMEOUT}s: {exc.stdout!r:.2000}", -1
        result: dict[str, Any] = {
            "args": args,
            "exit_code": code,
            "seconds": round(time.monotonic() - started, 1),
            "output": output,
        }
        if target.exists():
            result.update(json.loads(target.read_text()))
    return result


def markdown(results: dict[str, Any]) -> str:
    info = results["machine"]
    lines = [
        f"Run of {info['time']} on commit `{info['commit']}`: {info['cores']} cores, load average "
        f"{' '.join(str(x) for x in info['load_average'])} at start.",
        "",
        "| bench | figure | value | goal |",
        "|---|---|---:|---|",
    ]
    for name, bench in results["benches"].items():
        figures = bench.get("figures") or {}
        if not figures:
            lines.append(f"| {name} | (no figures: exit {bench['exit_code']}) | | |")
        for key, fig in figures.items():
            lines.append(f"| {name} | {key} | {fig['value']:g} {fig['unit']} | {fig.get('goal', '')} |")
    return "\n".join(lines) + "\n"


def compare(old_path: Path, new_path: Path) -> None:
    old, new = json.loads(old_path.read_text()), json.loads(new_path.read_text())
    print(f"{'figure':55} {'old':>12} {'new':>12} {'new/old':>8}")
    for name, bench in new["benches"].items():
        before = old["benches"].get(name, {}).get("figures", {})
        for key, fig in (bench.get("figures") or {}).items():
            was = before.get(key, {}).get("value")
            ratio = f"{fig['value'] / was:8.2f}" if was else "       -"
            shown = f"{was:12g}" if was is not None else f"{'-':>12}"
            print(f"{key:55} {shown} {fig['value']:12g} {ratio}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", help="comma-separated bench names")
    parser.add_argument("--quick", action="store_true", help="fewer runs per bench")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--markdown", action="store_true", help="print the table for the docs")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("OLD", "NEW"))
    parser.add_argument("--table", type=Path, metavar="RESULT", help="print a result's table")
    args = parser.parse_args()
    if args.table:
        print(markdown(json.loads(args.table.read_text())))
        return
    if args.compare:
        compare(*args.compare)
        return
    names = args.only.split(",") if args.only else list(BENCHES)
    results: dict[str, Any] = {"machine": machine(), "benches": {}}
    for name in names:
        if not (ROOT / "bench" / f"{name}.py").exists():
            continue
        full, quick = BENCHES.get(name, ([], []))
        print(f"== {name}", flush=True)
        results["benches"][name] = bench = run_bench(name, quick if args.quick else full)
        print(bench["output"], flush=True)
    out = args.out or ROOT / "bench" / "results" / (
        time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + ".json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    print(f"figures written to {out}")
    if args.markdown:
        print(markdown(results))


if __name__ == "__main__":
    main()
