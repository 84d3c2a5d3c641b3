"""A real browser for the status page: Debian's headless Chromium driven by Selenium.

Chromium and chromedriver come from Debian's packages (``chromium``, ``chromium-driver``;
``make test`` installs them as root). Browsers downloaded at run time are not used: the
paths are given, so Selenium fetches nothing. Where they are missing the tests skip and
say why. The service and the simulator are the reliability tests' subprocesses
(``harness``).
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ..reliability.conftest import harness  # noqa: F401  (the fixture, reused)

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# Without the background-networking flags Chromium keeps trying to reach Google's
# services, which a closed network answers with nothing but noise.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions", "--window-size=1280,1000")


@dataclass(frozen=True)
class Loaded:
    """One load of a page: its DOM as HTML, each type's state and text, console entries."""

    source: str
    types: dict[str, tuple[str, str]]  # data-type -> (data-state, visible text)
    console: list[dict[str, Any]]


@dataclass
class Browser:
    """The driver (synchronous) behind awaitable calls, and every console entry seen."""

    driver: Any
    console: list[dict[str, Any]] = field(default_factory=list)

    async def load(self, url: str) -> Loaded:
        return await asyncio.to_thread(self._load, url)

    def _load(self, url: str) -> Loaded:
        from selenium.webdriver.common.by import By

        self.driver.get(url)
        types = {el.get_attribute("data-type"): (el.get_attribute("data-state"), el.text)
                 for el in self.driver.find_elements(By.CSS_SELECTOR, "section[data-type]")}
        console = self.driver.get_log("browser")
        self.console += console
        return Loaded(self.driver.page_source, types, console)

    def errors(self) -> list[dict[str, Any]]:
        """Console entries of level SEVERE (errors) seen so far."""
        return [entry for entry in self.console if entry.get("level") == "SEVERE"]

    async def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(self.driver.save_screenshot, str(path))


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed: `make test` installs Debian's "
                    "chromium and chromium-driver with apt-get (as root); here it could not")
    webdriver = pytest.importorskip("selenium.webdriver",
                                    reason="selenium is not installed (pip install -e '.[dev]')")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        yield Browser(driver)
    finally:
        driver.quit()
        shutil.rmtree(tmp_path / "chromium-profile", ignore_errors=True)
