"""Every example script runs for real."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

pytestmark = [pytest.mark.vm]


def test_raw_vm_console_example() -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "raw_vm_console.py"), "echo", "from-the-guest;", "uname", "-r"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "from-the-guest"
    assert lines[1].endswith("-amd64")


def test_run_untrusted_python_example() -> None:
    snippet = "import os, sys; print(os.uname().nodename, 6 * 7); sys.exit(3)"
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "run_untrusted_python.py"), snippet],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 3, done.stderr
    assert re.fullmatch(r"capsa-[0-9a-f]{6} 42\n", done.stdout)


def test_ci_job_in_sandbox_example(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "test_math.py").write_text(
        "import unittest\n\nclass T(unittest.TestCase):\n    def test_add(self):\n        self.assertEqual(1 + 1, 2)\n"
    )
    reports = tmp_path / "reports"
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "ci_job_in_sandbox.py"), str(project), str(reports)],
        capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == "passed\n"
    assert "test_add" in (reports / "unittest.log").read_text()
    assert sorted(p.name for p in project.iterdir()) == ["test_math.py"]  # the source is untouched
