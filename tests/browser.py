"""Headless Chromium (Debian's `chromium`, installed by `./dev`): a page as the browser renders it."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import tempfile

TIMEOUT_S = 120
#: no background connections: this machine's closed network refuses them, one at a time
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars"]


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        raise RuntimeError("no chromium: `./dev setup` installs Debian's chromium package")
    return found


def _run(page: pathlib.Path, *args: str) -> str:
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        done = subprocess.run([chromium(), *FLAGS, f"--user-data-dir={profile}", *args, page.resolve().as_uri()],
                              capture_output=True, text=True, timeout=TIMEOUT_S, check=True)
    return done.stdout


def rendered_dom(page: pathlib.Path) -> str:
    """The page's DOM after Chromium loaded and laid it out."""
    return _run(page, "--dump-dom")


def screenshot(page: pathlib.Path, png: pathlib.Path, width: int = 1100, height: int = 1300) -> pathlib.Path:
    _run(page, f"--screenshot={png.resolve()}", f"--window-size={width},{height}")
    return png
