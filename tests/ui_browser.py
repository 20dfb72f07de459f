"""The browser side of the web UI's tests: Debian's headless Chromium driven by Selenium (one per test module,
the ``browser`` fixture), ``Page`` (navigation, waits, console errors, screenshots), and ``live_service`` (a real
API server with a real worker) for the modules that watch real jobs.

Importing it skips the importing module when Selenium is missing; the ``browser`` fixture skips, with the
reason, when Chromium or chromedriver is.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.api_server import serve_api
from tests.service_fixtures import WorkerProcess

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,900",
                 "--disable-dev-shm-usage"]  # fmt: skip

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the dev extra)")
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


def _missing_browser() -> str | None:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} is missing: install Debian's chromium and chromium-driver (scripts/test.sh does)"
    return None


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if why := _missing_browser():
        pytest.skip(why)
    from selenium.webdriver.chrome.service import Service as ChromeService

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in BROWSER_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


class Page:
    """The browser on one server: navigation, waits, console errors and screenshots."""

    def __init__(self, driver: Any, base: str, shots: Path):
        self.driver, self.base, self.shots = driver, base, shots
        shots.mkdir(parents=True, exist_ok=True)

    def open(self, route: str, ready: str, timeout: float = 15) -> float:
        """Load ``/ui#<route>`` afresh and wait for the CSS selector ``ready``; the seconds it took."""
        self.driver.get("about:blank")
        t0 = time.perf_counter()
        self.driver.get(f"{self.base}/ui#{route}")
        self.wait(ready, timeout)
        return time.perf_counter() - t0

    def wait(self, css: str, timeout: float = 15) -> Any:
        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.02).until(
                lambda d: d.find_element(By.CSS_SELECTOR, css)
            )
        except TimeoutException:
            raise AssertionError(f"no {css!r} on the page:\n{self.text()[:2000]}\n{self.console()}") from None

    def until(self, cond: Callable[[], Any], what: str, timeout: float = 15) -> Any:
        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.05).until(lambda d: cond())
        except TimeoutException:
            raise AssertionError(f"timed out waiting for {what}:\n{self.text()[:2000]}\n{self.console()}") from None

    def find(self, css: str) -> Any:
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def all(self, css: str) -> list[Any]:
        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def text(self) -> str:
        return self.driver.find_element(By.TAG_NAME, "body").text

    def console(self) -> list[dict[str, Any]]:
        """Console messages since the last call (Chromium hands each one out once)."""
        return self.driver.get_log("browser")

    def assert_no_console_errors(self, allowed: tuple[str, ...] = ()) -> None:
        errors = [e for e in self.console() if e["level"] == "SEVERE" and not any(a in e["message"] for a in allowed)]
        assert errors == [], errors

    def shot(self, name: str, whole_page: bool = False) -> Path:
        """A screenshot into the screenshots folder; ``whole_page``: the window grown to the page's height
        for the picture (and set back to 1280x900 after)."""
        path = self.shots / f"{name}.png"
        if whole_page:
            height = self.driver.execute_script("return document.body.scrollHeight") + 120
            self.driver.set_window_size(1280, height)
        try:
            self.driver.save_screenshot(str(path))
        finally:
            if whole_page:
                self.driver.set_window_size(1280, 900)
        return path


def live_service(folder: Path) -> Iterator[tuple[Any, WorkerProcess]]:
    """A real API server and a real worker on its data folder and broker (progress relayed every 0.2 s), stopped
    after the caller's tests: the body of the modules' ``live`` fixtures."""
    pytest.importorskip("torch")
    srv = serve_api(folder, LDD_PROGRESS_SECONDS="0.2")
    worker = WorkerProcess({"LDD_DATA_DIR": str(srv.data_dir), "LDD_BROKER_URL": srv.env["LDD_BROKER_URL"],
                            "LDD_PROGRESS_SECONDS": "0.2"}, srv.work / "worker.log").start()  # fmt: skip
    yield srv, worker
    worker.kill_all()
    srv.stop()
