"""Open a page in headless Chromium (Debian's `chromium`): how many images loaded, and a screenshot."""
from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

# Offline-friendly: no first-run, sync or background connections (refused on a closed network).
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
         "--disable-background-networking", "--disable-component-update", "--hide-scrollbars",
         "--virtual-time-budget=10000"]


def chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def open_page(page: Path, screenshot: Path | None = None, size: tuple[int, int] = (1280, 2400)) -> dict:
    """{"loaded": n, "total": n} as the page's own script counted them after the load event."""
    binary = chromium()
    if binary is None:
        raise FileNotFoundError("no chromium here: apt-get install chromium")
    url = Path(page).resolve().as_uri()
    with tempfile.TemporaryDirectory() as profile:
        base = [binary, *FLAGS, f"--user-data-dir={profile}"]
        dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
        if screenshot is not None:
            subprocess.run([*base, f"--screenshot={Path(screenshot).resolve()}", f"--window-size={size[0]},{size[1]}",
                            url], capture_output=True, text=True, timeout=120)
    loaded = re.search(r'data-images-loaded="(\d+)"', dom)
    total = re.search(r'data-images-total="(\d+)"', dom)
    if not (loaded and total):
        raise RuntimeError(f"the page's image check did not run in chromium; DOM starts: {dom[:300]!r}")
    return {"loaded": int(loaded.group(1)), "total": int(total.group(1))}
