"""A small client of chromedriver's W3C WebDriver HTTP API (httpx; no selenium in the pins).

with ChromeDriver(chromium) as driver:
    driver.get("http://127.0.0.1:8080/")
    driver.find("#element_row_limit").send_keys("7")
    driver.save_screenshot(path)
"""

from __future__ import annotations

import base64
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.fullstack.chromium import Chromium
from tests.fullstack.stack import Component, free_port, wait_for

ELEMENT_KEY = "element-6066-11e4-a52e-4f735466cecf"
# Chromium's connections are refused here without the background-networking flags; the rest keep
# a headless run quiet and reproducible (no first-run UI, no component updates or sync).
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,1000",
    "--lang=en-US",
)
# WebDriver key codes (the W3C spec's private-use code points).
ENTER, CONTROL = "\ue007", "\ue009"


class WebDriverError(RuntimeError):
    """chromedriver answered with an error (no such element, timeout, JavaScript error...)."""


@dataclass
class Element:
    driver: ChromeDriver
    id: str

    def _path(self, suffix: str) -> str:
        return f"/element/{self.id}/{suffix}"

    def click(self) -> None:
        self.driver.command("POST", self._path("click"), {})

    def clear(self) -> None:
        self.driver.command("POST", self._path("clear"), {})

    def send_keys(self, text: str) -> None:
        self.driver.command("POST", self._path("value"), {"text": text})

    @property
    def text(self) -> str:
        return self.driver.command("GET", self._path("text"))

    def attribute(self, name: str) -> Any:
        return self.driver.command("GET", self._path(f"property/{name}"))


class ChromeDriver:
    """chromedriver on a free loopback port and one headless Chromium session with a fresh profile."""

    def __init__(self, chromium: Chromium, log_dir: Path) -> None:
        self.chromium = chromium
        self.port = free_port()
        self.profile = Path(tempfile.mkdtemp(prefix="cb-chromium-profile-"))
        # Without --allowed-ips chromedriver listens on loopback only.
        self.process = Component(
            "chromedriver",
            [
                chromium.driver,
                f"--port={self.port}",
                f"--log-path={log_dir / 'chromedriver-verbose.log'}",
            ],
            env=None,
            log_path=log_dir / "chromedriver.log",
        )
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=60.0)
        self.session_id: str | None = None

    def __enter__(self) -> ChromeDriver:
        self.process.start()
        wait_for("chromedriver", lambda: self.http.get("/status").json()["value"]["ready"], 30)
        options = {
            "binary": self.chromium.browser,
            "args": [*CHROMIUM_ARGS, f"--user-data-dir={self.profile}"],
        }
        response = self.http.post(
            "/session",
            json={"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": options}}},
        )
        value = response.json()["value"]
        if response.is_error:
            raise WebDriverError(f"no Chromium session: {value}")
        self.session_id = value["sessionId"]
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            if self.session_id is not None:
                self.http.delete(f"/session/{self.session_id}")
        except httpx.HTTPError:
            pass
        finally:
            self.http.close()
            self.process.stop()
            shutil.rmtree(self.profile, ignore_errors=True)

    def command(self, method: str, path: str, body: dict | None = None) -> Any:
        response = self.http.request(method, f"/session/{self.session_id}{path}", json=body)
        value = response.json().get("value")
        if response.is_error:
            message = value.get("message", value) if isinstance(value, dict) else value
            raise WebDriverError(f"{method} {path}: {str(message).splitlines()[0]}")
        return value

    # -- the few commands the browser test needs --------------------------------------------

    def get(self, url: str) -> None:
        self.command("POST", "/url", {"url": url})

    @property
    def current_url(self) -> str:
        return self.command("GET", "/url")

    def execute(self, script: str, *args: Any) -> Any:
        return self.command("POST", "/execute/sync", {"script": script, "args": list(args)})

    def find_all(self, css: str) -> list[Element]:
        found = self.command("POST", "/elements", {"using": "css selector", "value": css})
        return [Element(self, item[ELEMENT_KEY]) for item in found]

    def find(self, css: str, timeout: float = 30.0) -> Element:
        """The first element matching ``css``, waiting for the page (a React app) to render it."""
        return wait_for(
            f"an element {css!r} on {self._safe_url()}", lambda: next(iter(self.find_all(css)), None), timeout
        )

    def find_by_text(self, css: str, text: str, timeout: float = 30.0) -> Element:
        """The first element matching ``css`` whose visible text contains ``text``."""

        def probe() -> Element | None:
            for element in self.find_all(css):
                try:
                    if text in element.text:
                        return element
                except WebDriverError:  # re-rendered meanwhile (stale element)
                    continue
            return None

        return wait_for(f"{css!r} with text {text!r} on {self._safe_url()}", probe, timeout)

    def save_screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self.command("GET", "/screenshot")))
        return path

    def execute_for_element(self, script: str, *args: Any) -> Element:
        """An element a script returns (for inputs the page gives no stable selector)."""
        found = self.execute(script, *args)
        if not isinstance(found, dict) or ELEMENT_KEY not in found:
            raise WebDriverError(f"the script returned no element: {script}")
        return Element(self, found[ELEMENT_KEY])

    def _safe_url(self) -> str:
        try:
            return self.current_url
        except (WebDriverError, httpx.HTTPError):
            return "the page"
