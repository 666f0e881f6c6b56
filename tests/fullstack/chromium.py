"""Debian's Chromium and chromedriver for the browser test: found, or installed with apt.

Nothing here downloads a browser build: the only source is the distribution's packages
(``chromium`` and ``chromium-driver``), installed the first time a machine runs the test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

APT_PACKAGES = ("chromium", "chromium-driver")
# Debian puts both under /usr/bin; PATH is searched first so a developer's own build also works.
CHROMIUM_NAMES = ("chromium", "chromium-browser")
DRIVER_NAMES = ("chromedriver",)
INSTALL_TIMEOUT = 900.0


class ChromiumUnavailable(RuntimeError):
    """Chromium is missing and cannot be installed here (no apt, not root, or apt failed)."""


@dataclass(frozen=True)
class Chromium:
    browser: str
    driver: str


def _which(names: tuple[str, ...]) -> str | None:
    for name in names:
        found = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
        if found:
            return found
    return None


def find_chromium() -> Chromium | None:
    browser, driver = _which(CHROMIUM_NAMES), _which(DRIVER_NAMES)
    return Chromium(browser, driver) if browser and driver else None


def ensure_chromium(log_path: Path | None = None) -> Chromium:
    """Chromium and chromedriver, installing Debian's packages first when they are missing.

    :param log_path: where apt's output goes (kept as a test artifact when an install fails).
    :raises ChromiumUnavailable: with the reason, when they are missing and apt cannot help.
    """
    found = find_chromium()
    if found:
        return found
    apt = shutil.which("apt-get")
    if apt is None:
        raise ChromiumUnavailable(
            "chromium/chromedriver are not installed and there is no apt-get to install them"
        )
    if os.geteuid() != 0:
        raise ChromiumUnavailable(
            "chromium/chromedriver are not installed and installing them with apt-get needs root: "
            f"run `apt-get install -y {' '.join(APT_PACKAGES)}`"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    steps = ([apt, "update"], [apt, "install", "-y", *APT_PACKAGES])
    output = []
    for step in steps:
        try:
            done = subprocess.run(step, env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT)
        except subprocess.TimeoutExpired as exc:
            raise ChromiumUnavailable(
                f"`{' '.join(step)}` did not finish in {INSTALL_TIMEOUT:.0f} s"
            ) from exc
        output.append(f"$ {' '.join(step)}\n{done.stdout}\n{done.stderr}")
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log_path.write_text("\n".join(output))
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
            raise ChromiumUnavailable(f"`{' '.join(step)}` failed ({done.returncode}): {' | '.join(tail)}")
    found = find_chromium()
    if found is None:
        raise ChromiumUnavailable(
            f"apt-get installed {APT_PACKAGES} but chromium/chromedriver are still not found"
        )
    return found
