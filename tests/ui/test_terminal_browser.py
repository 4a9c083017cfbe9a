"""The sandbox page's terminal and file browser in a real headless Chromium (conftest's shared
browser and server): typing ``echo ui-$((6*7))`` shows ``ui-42``, a killed sandbox's terminal says
so, and a file uploaded through the page is readable through the E2B SDK."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.ui.conftest import Page, UiServer

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]


def _css(page: Page, selector: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return list(page.driver.find_elements(By.CSS_SELECTOR, selector))


def _text(page: Page, selector: str) -> str:
    found = _css(page, selector)
    return str(found[0].text) if found else ""


def _open_sandbox_page(page: Page, ui_server: UiServer) -> Any:
    from e2b import Sandbox

    page.login("alice")
    sandbox = Sandbox.create(timeout=180, **ui_server.sdk(ui_server.keys["alice"]))
    page.open(f"/ui/sandboxes/{sandbox.sandbox_id}")
    return sandbox


def test_the_terminal_types_like_a_local_one_and_says_when_its_sandbox_is_killed(
    page: Page, ui_server: UiServer
) -> None:
    sandbox = _open_sandbox_page(page, ui_server)
    try:
        page.wait(lambda: _css(page, 'section#terminal[data-state="open"]'), "the terminal to connect")
        page.wait(lambda: "$" in _text(page, "#terminal .xterm-rows"), "the shell's prompt")
        _css(page, "#terminal .xterm-helper-textarea")[0].send_keys("echo ui-$((6*7))\n")
        page.wait(lambda: "ui-42" in _text(page, "#terminal .xterm-rows"), "ui-42 in the terminal")
        page.shot("terminal")
    finally:
        sandbox.kill()
    page.wait(
        lambda: "session ended: the sandbox was killed" in _text(page, "#terminal .terminal-status"),
        "the terminal to say its sandbox was killed",
    )


def test_a_file_uploaded_through_the_page_is_readable_through_the_sdk(
    page: Page, ui_server: UiServer, tmp_path: Path
) -> None:
    sandbox = _open_sandbox_page(page, ui_server)
    try:
        page.wait(lambda: _css(page, "#files .files-table tbody tr"), "the home directory's listing")
        local = tmp_path / "from-the-page.txt"
        local.write_text("uploaded through the dashboard\n")
        _css(page, "#files input[type=file]")[0].send_keys(str(local))
        _css(page, "#files .files-upload button")[0].click()
        page.wait(
            lambda: _css(page, '#files tr[data-name="from-the-page.txt"]'), "the uploaded file's row"
        )
        page.shot("files")
        assert sandbox.files.read("/home/user/from-the-page.txt") == "uploaded through the dashboard\n"
        assert sandbox.files.get_info("/home/user/from-the-page.txt").owner == "user"
    finally:
        sandbox.kill()
