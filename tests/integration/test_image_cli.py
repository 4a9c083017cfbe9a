"""Named images end to end, as a user runs them: ``capsa image import`` → ``ls`` → ``exec --image``
→ the pytest marker's ``image=`` → ``rm`` (on real guests; the image is a busybox-only archive the
test writes itself, registered under a unique name in the real cache and removed afterwards)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.unit.test_oci import BUSYBOX, base_layer, docker_archive, top_layer

pytest_plugins = ["pytester"]
pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(not BUSYBOX.exists(), reason="needs a static /bin/busybox"),
]

CAPSA = [sys.executable, "-m", "capsa.cli"]


def capsa(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CAPSA, *args], capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.timeout(600)
def test_import_ls_exec_marker_rm(tmp_path: Path, pytester: pytest.Pytester) -> None:
    name = f"clitest-{uuid.uuid4().hex[:8]}"
    archive = docker_archive(tmp_path / "bb.tar", [base_layer(), top_layer()])
    done = capsa("image", "import", str(archive), "--name", name, "--json")
    try:
        assert done.returncode == 0, done.stderr
        entry = json.loads(done.stdout)
        listing = json.loads(capsa("image", "ls", "--json").stdout)
        mine = next(row for row in listing if row["kind"] == "named" and row["name"] == name)
        assert mine["layers"] == 1 and mine["bytes"] > 0 and mine["last_used"] is None

        archive.unlink()  # a named image no longer needs its archive
        done = capsa("exec", "--image", name, "--memory", "256M", "--", "cat", "/etc/os-release")
        assert done.returncode == 0, done.stderr
        assert "capsa test image v2" in done.stdout  # the image's own file, by its name

        pytester.makepyfile(
            f"""
            import pytest

            @pytest.mark.capsa(image="{name}", memory_mb=256)
            def test_in_the_named_image(capsa_sandbox):
                out = capsa_sandbox.agent.exec("cat").arg("/opt/new").run()
                assert out.stdout == "new\\n"
                assert capsa_sandbox.agent.info().image == "{name}"

            @pytest.mark.capsa(image="no-such-image-{name}")
            def test_unknown_image(capsa_sandbox):
                pass
            """
        )
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA", timeout=300)
        result.assert_outcomes(passed=1, errors=1)
        result.stdout.fnmatch_lines(["*unknown image 'no-such-image-*"])

        listing = json.loads(capsa("image", "ls", "--json").stdout)
        mine = next(row for row in listing if row["kind"] == "named" and row["name"] == name)
        assert mine["last_used"] is not None
        layer = entry["path"]
        templates = [
            t for t in Path(layer).parents[2].joinpath("templates").glob("*/snapshot.json")
            if layer in t.read_text()
        ]  # fmt: skip
        assert templates, "exec --image records a template of the image"
    finally:
        done = capsa("image", "rm", name)
    assert done.returncode == 0, done.stderr
    assert not Path(entry["path"]).exists()
    assert all(not t.exists() for t in templates)
    bad = capsa("exec", "--image", name, "--", "true")
    assert bad.returncode == 2 and f"unknown image {name!r}" in bad.stderr
    assert "Traceback" not in bad.stderr and os.path.exists(CAPSA[0])


@pytest.mark.timeout(300)
def test_build_recipe_with_a_name_then_rm(tmp_path: Path) -> None:
    """``capsa image build FILE --name NAME`` (a recipe without run steps: no build VM)."""
    name = f"clirecipe-{uuid.uuid4().hex[:8]}"
    recipe = tmp_path / "tools.toml"
    recipe.write_text('[[steps]]\nenv = {APP_MODE = "test"}\n[[steps]]\nworkdir = "/srv"\n')
    done = capsa("image", "build", str(recipe), "--name", name, "--json")
    try:
        assert done.returncode == 0, done.stderr
        entry = json.loads(done.stdout)
        assert entry["from"] == "recipe" and entry["layers"] >= 1
        assert "workdir /srv" in done.stderr  # the per-step progress
        listing = json.loads(capsa("image", "ls", "--json").stdout)
        assert any(row.get("name") == name and row["kind"] == "named" for row in listing)
    finally:
        done = capsa("image", "rm", name)
    assert done.returncode == 0, done.stderr
    bad = capsa("image", "build", str(tmp_path / "missing.toml"))
    assert bad.returncode == 2 and "recipe not found" in bad.stderr
