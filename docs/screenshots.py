"""Screenshots of the app for the README: ``python3 docs/screenshots.py [--cache DIR]``.

Starts ``streamlit run app.py`` headless on a free port (the bundled model; analyzed into the cache first
if needed), opens each page in headless chromium once it has finished running, and writes
``docs/<page>.png``.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from app_harness import CHROMIUM, CHROMIUM_ARGS, ensure_bundled, settle, streamlit_server  # noqa: E402

SHOTS = {"how_awq_works": "How AWQ works", "layer_lab": "Layer Lab", "overview": "Overview",
         "importance_map": "Importance map", "clipping": "Clipping", "methods": "Methods", "model_quality": "Model quality",
         "plan": "Plan", "compare": "Compare"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cache", default=str(ROOT / "cache"), help="cache folder the app reads (default: ./cache)")
    ap.add_argument("--pages", default=",".join(SHOTS), help="comma-separated page slugs")
    ap.add_argument("--width", type=int, default=1500)
    ap.add_argument("--height", type=int, default=1350)
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    cache = Path(args.cache)
    ensure_bundled(cache)
    log = Path(tempfile.gettempdir()) / "awq_explorer_screenshots.log"
    with streamlit_server(cache, log) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": args.width, "height": args.height})
        page.goto(url, timeout=120_000)
        settle(page)
        for slug in args.pages.split(","):
            link = page.locator('[data-testid="stSidebarNav"] a', has_text=SHOTS[slug])
            if link.count() == 0:  # a page this build does not have (yet)
                continue
            link.first.click()
            settle(page)
            if slug == "importance_map":
                page.frame_locator("iframe#stpyvistaframe").locator("canvas").first.wait_for(timeout=60_000)
                time.sleep(3)  # vtk.js draws after the iframe has loaded
            out = ROOT / "docs" / f"{slug}.png"
            page.screenshot(path=str(out))
            print(out)
        browser.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
