"""Named images as templates, and the code interpreter's PNG results for matplotlib figures."""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

code_interpreter = pytest.importorskip("e2b_code_interpreter")

from capsa.errors import CapsaError  # noqa: E402
from tests.server.conftest import API_KEY, Server, start_server  # noqa: E402

pytestmark = [pytest.mark.vm]

IMAGE = "capsa-serve-mpl"
RECIPE = Path(__file__).with_name("data") / f"{IMAGE}.toml"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def mpl_image() -> str:
    """The recipe registered as ``capsa-serve-mpl``: found in the cache, or built when
    ``CAPSA_TEST_BUILD_IMAGES=1`` (matplotlib wheels from PyPI, a few seconds)."""
    store = pytest.importorskip("capsa.recipes.store")
    recipe = pytest.importorskip("capsa.recipes.toml")
    entry = store.lookup(IMAGE)
    if entry is not None and entry.built() is not None:
        return IMAGE
    if not os.environ.get("CAPSA_TEST_BUILD_IMAGES"):
        pytest.skip(
            f"needs the image {IMAGE} (matplotlib): set CAPSA_TEST_BUILD_IMAGES=1 to build "
            f"it, or run `capsa image build {RECIPE} --name {IMAGE}`"
        )
    try:
        store.register(IMAGE, recipe.load_recipe(RECIPE), kind="recipe", source=RECIPE)
    except CapsaError as exc:
        pytest.skip(f"building {IMAGE} failed (no route to PyPI?): {exc}")
    return IMAGE


@pytest.fixture(scope="module")
def plain_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(tmp_path_factory.mktemp("images"), "--memory", "512")
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.timeout(600)
def test_matplotlib_figures_are_png_results(mpl_image: str, plain_server: Server) -> None:
    sandbox = code_interpreter.Sandbox.create(
        template=mpl_image,
        timeout=300,
        api_key=API_KEY,
        api_url=plain_server.url,
        sandbox_url=plain_server.url,
    )
    try:
        assert sandbox.get_info().template_id == mpl_image
        code = (
            "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [4, 1, 9])\nplt.title('x')\nplt.show()"
        )
        execution = sandbox.run_code(code, timeout=240)
        assert execution.error is None, execution.error
        pngs = [r.png for r in execution.results if r.png]
        assert len(pngs) == 1
        assert base64.b64decode(pngs[0]).startswith(PNG_MAGIC)
        assert not [r for r in execution.results if r.is_main_result]  # plt.show() returns None
        assert "non-interactive" not in "".join(execution.logs.stderr)  # no backend warning
        # a figure as the cell's value is its main result; figures are closed after each cell
        execution = sandbox.run_code("fig = plt.figure()\nfig.gca().bar([1], [2])\nfig")
        assert [bool(r.png) for r in execution.results] == [True]
        assert execution.results[0].is_main_result
        assert sandbox.run_code("len(plt.get_fignums())").text == "0"
    finally:
        sandbox.kill()
