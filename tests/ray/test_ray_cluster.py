"""Runs netns_suite.py (capsa.ray on a simulated 3-node Ray cluster) in a network namespace with only
loopback up, and reports each of its tests as one test here.

Ray binds to the host's interface address even when told 127.0.0.1, and tests may only use
127.0.0.0/8: so the whole cluster, its drivers and its VMs live in ``unshare -n``. One child pytest
runs the suite once (one cluster for all of it); its JUnit report gives each test's outcome, and a
failure here shows that test's failure text and the tail of the child's output.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from capsa import _guardian
from capsa._paths import runtime_base

SUITE = Path(__file__).with_name("netns_suite.py")
ROOT = Path(__file__).resolve().parents[2]
SUITE_TIMEOUT = 600


def _suite_tests() -> list[str]:
    tree = ast.parse(SUITE.read_text())
    return [
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test_")
    ]


@dataclass
class SuiteRun:
    output: str
    returncode: int
    results: dict[str, tuple[str, str]] = field(default_factory=dict)  # id -> (outcome, text)

    def tail(self, lines: int = 80) -> str:
        kept = [
            line
            for line in self.output.splitlines()
            if "network_util.cc" not in line and "[state-dump]" not in line
        ]
        return "\n".join(kept[-lines:])


@pytest.fixture(scope="module")
def suite_run(tmp_path_factory: pytest.TempPathFactory) -> SuiteRun:
    pytest.importorskip("ray")
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs root, unshare and ip (a network namespace for the Ray cluster)")
    report = tmp_path_factory.mktemp("ray") / "junit.xml"
    script = 'ip link set lo up && exec "$0" -m pytest "$1" -q -p no:cacheprovider --junitxml "$2"'
    # Ray's session files (logs, sockets) go to a short directory of this run's, removed afterwards,
    # instead of piling up in /tmp/ray (a pytest tmp path is too long for Ray's unix sockets).
    ray_tmp = tempfile.mkdtemp(prefix="capsa-ray-")
    env = {**os.environ, "CAPSA_RAY_NETNS": "1", "RAY_TMPDIR": ray_tmp}
    try:
        done = subprocess.run(
            ["unshare", "-n", "sh", "-c", script, sys.executable, str(SUITE), str(report)],
            check=False,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=SUITE_TIMEOUT,
        )
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else ""
        pytest.fail(f"the Ray suite ran past {SUITE_TIMEOUT}s:\n{out[-5000:]}")
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
        # Ray kills an actor's children with it, the guardian of its runtime root included: the
        # roots the killed host actors leave are swept (the next capsa process would do the same).
        _guardian.sweep_orphaned_roots(runtime_base())
    run = SuiteRun(done.stdout + done.stderr, done.returncode)
    if report.exists():
        for case in ET.parse(report).getroot().iter("testcase"):
            outcome, text = "passed", ""
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    outcome = child.tag
                    text = (child.get("message") or "") + "\n" + (child.text or "")
            run.results[case.get("name", "")] = (outcome, text)
    return run


@pytest.mark.vm
@pytest.mark.timeout(SUITE_TIMEOUT + 60)
@pytest.mark.parametrize("name", _suite_tests())
def test_in_ray_cluster(suite_run: SuiteRun, name: str) -> None:
    mine = {
        test: result
        for test, result in suite_run.results.items()
        if test == name or test.startswith(name + "[")
    }
    if not mine:
        pytest.fail(f"{name} did not run in the Ray suite; its output:\n{suite_run.tail()}")
    bad = {test: text for test, (outcome, text) in mine.items() if outcome in ("failure", "error")}
    if bad:
        details = "\n\n".join(f"--- {test} ---\n{text[-4000:]}" for test, text in bad.items())
        pytest.fail(f"{details}\n\n--- Ray suite output (tail) ---\n{suite_run.tail()}")
    if all(outcome == "skipped" for outcome, _ in mine.values()):
        pytest.skip(next(iter(mine.values()))[1][:500])
