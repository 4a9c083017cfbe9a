"""Named images (``capsa.recipes.store``) and the ``capsa image import|ls|rm|build`` commands (no VM).

Each test has its own cache (``CAPSA_CACHE_DIR``) and imports a small busybox-only Docker archive it
writes itself.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import capsa
from capsa.cli import main
from capsa.errors import ConfigError, ImageError
from capsa.pytest_plugin import _builder
from capsa.recipes import store
from tests.unit.test_oci import BUSYBOX, base_layer, docker_archive, top_layer

pytestmark = pytest.mark.skipif(
    shutil.which("tar2sqfs") is None or not BUSYBOX.exists(),
    reason="needs squashfs-tools-ng and a static /bin/busybox",
)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("CAPSA_CACHE_DIR", str(root))
    return root


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    return docker_archive(tmp_path / "bb.tar", [base_layer(), top_layer()])


def test_named_image_resolves_without_its_archive(cache: Path, archive: Path) -> None:
    entry = store.import_oci("web", archive)
    assert entry.kind == "oci" and len(entry.layers) == 1 and entry.size > 0
    assert entry.last_used is None
    record = cache / "images" / "named" / "web.json"
    assert json.loads(record.read_text())["source"] == str(archive)
    assert not list(record.parent.glob(".*part"))  # written atomically
    archive.unlink()  # the registry, not the archive, is what a name resolves through
    image = store.resolve_image("web")
    assert isinstance(image, capsa.Image) and image.name == "web"
    built = image.build()
    assert [str(p) for p in built.layers] == list(entry.layers)
    assert built.config.workdir == "/srv"
    assert store.lookup("web") is not None and store.lookup("web").last_used is not None  # type: ignore[union-attr]


def test_layers_gone_rebuild_from_the_source_or_say_so(cache: Path, archive: Path) -> None:
    entry = store.import_oci("web", archive)
    shutil.rmtree(entry.directory)
    assert store.resolve_image("web").build().layers[0].is_file()  # rebuilt from the archive
    shutil.rmtree(entry.directory)
    archive.unlink()
    with pytest.raises(ImageError, match="no longer in the cache") as caught:
        store.resolve_image("web").build()
    assert "capsa image import" in str(caught.value.hint)


def test_bad_refs_are_config_errors_listing_the_names(cache: Path, archive: Path) -> None:
    store.import_oci("alpha", archive)
    store.import_oci("beta", archive)
    with pytest.raises(ConfigError, match="unknown image 'gamma'") as caught:
        store.resolve_image("gamma")
    assert "alpha, beta" in str(caught.value.hint)
    with pytest.raises(ConfigError, match="recipe not found"):
        store.resolve_image(str(cache / "missing.toml"))
    for bad in ("../x", "a/b", "", ".hidden", "x" * 64):
        with pytest.raises(ConfigError, match="invalid image name"):
            store.import_oci(bad, archive)
    assert sorted(p.name for p in (cache / "images" / "named").iterdir()) == [
        "alpha.json",
        "beta.json",
    ]
    (cache / "images" / "named" / "broken.json").write_text("{not json")
    assert [e.name for e in store.named_images()] == ["alpha", "beta"]  # ignored, not fatal
    assert isinstance(store.resolve_image(str(archive)), capsa.Image)  # an archive path works too


def _template(cache: Path, name: str, disks: list[str]) -> Path:
    directory = cache / "templates" / name
    directory.mkdir(parents=True)
    record = {"disks": [[d, True, "raw"] for d in disks]}
    (directory / "snapshot.json").write_text(json.dumps({"format": 1, "record": record}))
    return directory


def test_rm_removes_the_image_and_only_its_templates(cache: Path, archive: Path) -> None:
    web = store.import_oci("web", archive)
    other = store.import_oci("other", archive)  # same content, other name: its own layer
    assert web.layers != other.layers
    mine = _template(cache, "t-web", list(web.layers))
    theirs = _template(cache, "t-other", list(other.layers))
    default = _template(cache, "t-default", [])
    removed = store.remove("web")
    assert mine in removed and Path(web.directory) in removed
    assert not mine.exists() and not Path(web.directory).exists()
    assert theirs.exists() and default.exists() and Path(other.layers[0]).is_file()
    assert store.lookup("web") is None
    with pytest.raises(ConfigError, match="no image named 'web'"):
        store.remove("web")


def test_reimport_under_a_name_drops_only_what_the_old_image_used(
    cache: Path, archive: Path, tmp_path: Path
) -> None:
    old = store.import_oci("web", archive)
    old_template = _template(cache, "t-old", list(old.layers))
    partial = _template(cache, "t-partial", [*old.layers, "/elsewhere/other.sqfs"])
    other = docker_archive(tmp_path / "other.tar", [base_layer()])
    new = store.import_oci("web", other)
    assert new.directory != old.directory and not Path(old.directory).exists()
    assert not old_template.exists() and partial.exists()  # only the exact image's template
    assert store.resolve_image("web").build().layers == tuple(Path(p) for p in new.layers)


def test_rm_keeps_layers_another_name_shares(cache: Path, archive: Path) -> None:
    web = store.import_oci("web", archive)
    # A second name recorded for the very same build (e.g. by a recipe registered twice).
    alias = store.NamedImage(**{**web.to_json(), "name": "alias", "layers": web.layers})
    store._record(alias)
    store.remove("web")
    assert Path(web.layers[0]).is_file() and store.resolve_image("alias").build()


def test_cli_import_ls_rm(cache: Path, archive: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["image", "import", str(archive), "--name", "web", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["name"] == "web" and row["layers"] == 1 and row["last_used"] is None
    assert main(["image", "ls"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("web "))
    assert line.split()[:2] == ["web", "1"] and "never" in line and str(archive) in line
    store.resolve_image("web").build()  # what a sandbox does: marks it used
    assert main(["image", "ls", "--json"]) == 0
    named = [r for r in json.loads(capsys.readouterr().out) if r["kind"] == "named"]
    assert named[0]["name"] == "web" and named[0]["last_used"] is not None
    assert main(["image", "rm", "web"]) == 0
    assert "web.json" in capsys.readouterr().out
    assert main(["image", "rm", "web"]) == 2
    assert "no image named 'web'" in capsys.readouterr().err
    assert main(["image", "import", str(archive.with_name("nope.tar")), "--name", "x"]) == 2
    assert "image not found" in capsys.readouterr().err
    assert main(["image", "build", "--name", "x"]) == 2  # --name needs a recipe FILE


def test_cli_build_recipe_missing_file(cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["image", "build", str(cache / "nope.toml")]) == 2
    assert "recipe not found" in capsys.readouterr().err


def test_marker_image_option_resolves_names(cache: Path, archive: Path) -> None:
    store.import_oci("web", archive)
    builder, _ = _builder({"image": "web", "memory_mb": 256})
    assert builder._target._config.image is not None
    assert builder._target._config.image.name == "web"
    with pytest.raises(ConfigError, match="unknown image"):
        _builder({"image": "nope"})


def test_progress_shows_each_step_and_the_failing_steps_output() -> None:
    import io

    from rich.console import Console

    from capsa.cli._progress import build_steps

    class StepFailed(ImageError):
        def __init__(self) -> None:
            super().__init__("step 2 failed")
            self.output = "line one\n[not markup] line two\n"

    out = io.StringIO()
    console = Console(file=out, width=100, force_terminal=False)
    with pytest.raises(StepFailed), build_steps(console) as steps:
        steps("base: building")
        steps("base: built in 0.1s")
        steps("step 2/2: run make")
        raise StepFailed
    text = out.getvalue()
    assert "base: built in 0.1s" in text and "base: building" not in text  # one line per step
    assert "step 2/2: run make  failed" in text
    assert "[not markup] line two" in text and "output of the failed step" in text
