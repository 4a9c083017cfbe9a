"""Template cache housekeeping without a VM: stale and half-written templates are removed."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from capsa.sandbox import builder


def test_partials_of_dead_processes_and_unreadable_templates_are_pruned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CAPSA_CACHE_DIR", str(tmp_path))
    root = builder.template_root()
    root.mkdir()
    gone = subprocess.Popen(["true"])
    gone.wait()
    (root / f".abc.partial-{gone.pid}").mkdir()  # killed while recording
    (root / f".def.partial-{os.getpid()}").mkdir()  # still being recorded by a live process
    (root / "broken").mkdir()  # no metadata: can never restore
    builder._prune_stale_templates("/usr/bin/true")
    assert sorted(p.name for p in root.iterdir()) == [f".def.partial-{os.getpid()}"]
