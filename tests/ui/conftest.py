"""The dashboard's tests: ONE real ``capsa serve`` (with two tenants and the admin key) and ONE
headless Chromium driven by Selenium, shared by every module of tests/ui (session scope: a
browser and a server each take seconds to start on a loaded machine).

Browser tests skip, with the reason, only when Chromium or its driver is not installed
(``scripts/setup.sh`` installs ``chromium`` and ``chromium-driver``). Screenshots go to
``$CAPSA_TEST_ARTIFACTS/ui`` (default ``test-artifacts/ui``)."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.server.conftest import API_KEY, Server, start_server

ALICE = "alice-ui-key-0123456789"
BOB = "bob-ui-key-0123456789"
ADMIN = API_KEY  # CAPSA_API_KEY: the admin key of the tenant "default"
# Debian's chromium (Ubuntu's chromium-browser) and chromedriver; CAPSA_CHROMIUM/_CHROMEDRIVER
# name others
CHROMIUM = (
    os.environ.get("CAPSA_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
)
CHROMEDRIVER = os.environ.get("CAPSA_CHROMEDRIVER") or shutil.which("chromedriver")
BROWSER_ARGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--window-size=1400,1000",
)
WAIT = 30.0  # seconds any browser wait may take on a loaded 2-core machine


def artifacts() -> Path:
    root = os.environ.get("CAPSA_TEST_ARTIFACTS")
    base = Path(root) if root else Path(__file__).resolve().parents[2] / "test-artifacts"
    target = base / "ui"
    target.mkdir(parents=True, exist_ok=True)
    return target


@dataclass
class UiServer:
    server: Server
    keys: dict[str, str] = field(default_factory=dict)  # tenant name -> its key

    @property
    def url(self) -> str:
        return self.server.url

    def sdk(self, key: str) -> dict[str, Any]:
        """The E2B SDK's connection options for ``key`` against this server."""
        return {"api_key": key, "api_url": self.url, "sandbox_url": self.url}


@pytest.fixture(scope="session")
def ui_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UiServer]:
    """``capsa serve`` with the dashboard, tenants alice and bob (plain keys) and the admin key,
    a base pool of 2 and metrics sampled every second."""
    tmp = tmp_path_factory.mktemp("ui-serve")
    keys = tmp / "keys.txt"
    keys.write_text(f"{ALICE} tenant=alice\n{BOB} tenant=bob\n")
    server = start_server(
        tmp,
        *("--api-key-file", str(keys), "--pool", "base=2", "--max-sandboxes", "8"),
        *("--metrics-interval", "1"),
    )
    try:
        yield UiServer(server, {"alice": ALICE, "bob": BOB, "admin": ADMIN})
    finally:
        server.stop()


@pytest.fixture(scope="module")
def server(ui_server: UiServer) -> Server:
    """The shared server itself, for the modules that talk to it without a browser."""
    return ui_server.server


@pytest.fixture(scope="module")
def sbx(ui_server: UiServer) -> Iterator[Any]:
    """One of alice's sandboxes (an ``e2b.Sandbox``) for the module, killed after it."""
    e2b = pytest.importorskip("e2b")
    sandbox = e2b.Sandbox.create(**ui_server.sdk(ALICE), retries=0)
    try:
        yield sandbox
    finally:
        sandbox.kill()


def chromium_missing() -> str | None:
    """Why browser tests cannot run here (None: they can)."""
    for name, path in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)):
        if path is None or not os.access(path, os.X_OK):
            return f"{name} is not installed (scripts/setup.sh installs chromium and chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    return None


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """One headless Chromium for every browser test."""
    reason = chromium_missing()
    if reason is not None:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    assert CHROMIUM is not None and CHROMEDRIVER is not None
    options.binary_location = CHROMIUM
    for argument in BROWSER_ARGS:
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(WAIT)
    driver.set_script_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()


class Page:
    """The browser on the dashboard: log in as a tenant, open pages, wait, screenshot."""

    def __init__(self, driver: Any, server: UiServer) -> None:
        self.driver = driver
        self.server = server
        self.tenant: str | None = None

    def open(self, path: str) -> None:
        self.driver.get(self.server.url + path)

    def login(self, tenant: str) -> None:
        """A fresh session of ``tenant`` (the last one's cookie dropped), on the list page."""
        from selenium.webdriver.common.by import By

        if self.tenant == tenant and self.driver.current_url.startswith(self.server.url + "/ui/"):
            self.open("/ui/")
            if self.driver.find_elements(By.ID, "sandboxes"):
                return
        self.open("/ui/login")
        self.driver.delete_all_cookies()
        self.open("/ui/login")
        self.driver.find_element(By.ID, "api_key").send_keys(self.server.keys[tenant])
        self.driver.find_element(By.ID, "login").click()
        self.wait(lambda: self.driver.find_elements(By.ID, "sandboxes"), "the list page after login")
        self.tenant = tenant

    def wait(self, condition: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            time.sleep(0.05)
        self.shot(f"timeout-{what.replace(' ', '-')[:40]}")
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")

    def row(self, sandbox_id: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        return list(self.driver.find_elements(By.CSS_SELECTOR, f'#sandboxes tr[data-id="{sandbox_id}"]'))

    def shot(self, name: str) -> Path:
        """Save the whole page (the window grown to its height for the shot) as ``name``.png."""
        path = artifacts() / f"{name}.png"
        height = self.driver.execute_script("return document.documentElement.scrollHeight")
        self.driver.set_window_size(1400, min(max(int(height or 0), 1000), 4000))
        self.driver.execute_script("window.scrollTo(0, 0)")
        try:
            self.driver.save_screenshot(str(path))
        finally:
            self.driver.set_window_size(1400, 1000)
        return path


@pytest.fixture
def page(browser: Any, ui_server: UiServer) -> Page:
    return Page(browser, ui_server)
