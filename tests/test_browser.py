"""The app in a real browser: ``streamlit run app.py`` driven by Playwright through Debian's chromium.

Visits every page (the first one by deep link, as a bookmark would), drags the Layer Lab's alpha slider
and checks the shown error against ``Analysis.evaluate_layer``, downloads a PNG, and checks that the 3D
view (vtk.js in an iframe, scripts inlined: no network) draws something. A first visit walks "How AWQ
works" into the Layer Lab, and the charts drawn in the page (SVG) carry the titles and axis titles the
specs promise, following the duo-scaling and clipping toggles. Skipped only without chromium.
"""
from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest

from app_harness import (CHROMIUM, CHROMIUM_ARGS, PAGES, ensure_bundled, metric_value, settle, shared_cache,
                         streamlit_server)
from core.methods import awq_search as awq
from core.present import common, how_awq_works
from core.analysis import open_entry

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium at /usr/bin/chromium")

PAGE_TITLES = ["How AWQ works", "Overview", "Layer Lab", "Importance map", "Clipping", "Compare", "Model quality"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cache = shared_cache(tmp_path_factory)
    analysis = ensure_bundled(cache)  # what a first open computes; the app then opens it from the cache
    log = tmp_path_factory.mktemp("streamlit") / "server.log"
    with streamlit_server(cache, log) as url:
        yield url, analysis, log, cache


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


def assert_page_ok(page, title: str) -> None:
    assert page.locator('[data-testid="stMain"] h1').first.inner_text().strip() == title
    assert page.locator('[data-testid="stException"]').count() == 0, page.locator('[data-testid="stException"]').first.inner_text()
    errors = page.locator('[data-testid="stAlertContentError"]')
    assert errors.count() == 0, errors.first.inner_text()


def go(page, title: str) -> None:
    page.locator('[data-testid="stSidebarNav"] a', has_text=title).first.click()
    settle(page)
    assert_page_ok(page, title)


def lab_summary(page) -> tuple[str, int, int]:
    """(layer, bits, group size) from the Layer Lab's summary line: 'name · family · in→out · w3 · group 128 ...'."""
    parts = [p.strip() for p in page.locator(".st-key-lab_summary").inner_text().split("·")]
    group = parts[4].removeprefix("group ").strip()
    return parts[0], int(parts[3].removeprefix("w")), 0 if group == "per row" else int(group)


def _slider(page, label: str):
    return page.locator('[data-testid="stMain"] [data-testid="stSlider"]', has_text=label).first


def slider_value(page, label: str) -> float:
    return float(_slider(page, label).locator('input[type="range"]').first.input_value())


def drag_slider(page, label: str, fraction: float) -> None:
    """Press the thumb, move to ``fraction`` of the track, release: one slider release, as a user does."""
    thumb = _slider(page, label).locator('input[type="range"]').first.locator("xpath=../..")  # the visible knob
    track = thumb.locator("xpath=..").bounding_box()
    tb = thumb.bounding_box()
    y = tb["y"] + tb["height"] / 2
    page.mouse.move(tb["x"] + tb["width"] / 2, y)
    page.mouse.down()
    page.mouse.move(track["x"] + fraction * track["width"], y, steps=8)
    page.mouse.up()


def test_every_page_in_a_real_browser(server, browser, tmp_path):
    url, analysis, log, _ = server
    ctx = browser.new_context(viewport={"width": 1500, "height": 1100}, accept_downloads=True)
    page = ctx.new_page()
    try:
        # A deep link first: the fresh server must still route through app.py (sidebar, navigation).
        page.goto(f"{url}/overview", timeout=120_000)
        settle(page)
        assert_page_ok(page, "Overview")
        assert metric_value(page, "Linears") == str(len(analysis.names))
        assert page.locator('[data-testid="stSidebarNav"] a').count() == len(PAGES)

        # Layer Lab: drag alpha, the shown error follows the engine.
        go(page, "Layer Lab")
        engine = open_entry(analysis.path)
        layer, bits, group = lab_summary(page)
        assert layer in engine.names, layer
        before_alpha, before = slider_value(page, "alpha"), metric_value(page, "AWQ rel. error")
        drag_slider(page, "alpha", 0.12)
        t0 = time.perf_counter()
        page.wait_for_function(
            """([label, old]) => { for (const m of document.querySelectorAll('[data-testid="stMetric"]')) {
                   const l = m.querySelector('[data-testid="stMetricLabel"]');
                   if (l && l.innerText.trim() === label)
                       return m.querySelector('[data-testid="stMetricValue"]').innerText.trim() !== old; }
                 return false; }""", arg=["AWQ rel. error", before], timeout=60_000)
        shown_after_s = time.perf_counter() - t0
        settle(page)
        alpha = slider_value(page, "alpha")
        assert alpha != before_alpha
        after = metric_value(page, "AWQ rel. error")
        assert after != before
        assert lab_summary(page) == (layer, bits, group)
        assert f"alpha {alpha:.2f}" in page.locator(".st-key-lab_summary").inner_text()
        ev = engine.evaluate_layer(layer, alpha=alpha, bits=bits, group_size=group)
        assert after == common.fmt_rel(ev.awq_rel)
        assert metric_value(page, "RTN rel. error") == common.fmt_rel(ev.rtn_rel)
        print(f"\nbrowser: alpha {before_alpha} -> {alpha}; new error shown {shown_after_s * 1000:.0f} ms after release")

        # Download the loss curve as PNG (generated on click).
        with page.expect_download(timeout=60_000) as dl:
            page.locator('[data-testid="stDownloadButton"]', has_text="PNG").first.click()
        png = Path(dl.value.path()).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
        assert dl.value.suggested_filename.endswith("rel_error_vs_alpha.png")

        # Importance map: the 3D view is drawn (not a blank canvas) without any network.
        go(page, "Importance map")
        frame = page.locator("iframe#stpyvistaframe").first
        frame.wait_for(state="visible", timeout=60_000)
        page.frame_locator("iframe#stpyvistaframe").locator("canvas").first.wait_for(state="attached", timeout=60_000)
        assert_canvas_drawn(frame, tmp_path)

        for title in ("Clipping", "Compare", "Model quality"):
            go(page, title)
    finally:
        ctx.close()
    assert "Traceback" not in log.read_text()


def assert_canvas_drawn(frame, tmp_path: Path, timeout: float = 60.0) -> None:
    """The iframe region shows a rendered surface: many distinct colours, not one flat fill."""
    from PIL import Image

    deadline = time.time() + timeout
    while True:
        img = np.asarray(Image.open(io.BytesIO(frame.screenshot())).convert("RGB")).astype(float)
        h, w, _ = img.shape
        core = img[h // 6: 5 * h // 6, w // 8: 7 * w // 8]  # the scene, away from the border
        n_colors = len(np.unique(core.reshape(-1, 3), axis=0))
        if core.std() > 8 and n_colors > 200:
            return
        if time.time() > deadline:
            Image.fromarray(img.astype(np.uint8)).save(tmp_path / "blank_3d.png")
            raise AssertionError(f"3D view looks blank: std {core.std():.1f}, {n_colors} colours "
                                 f"(screenshot: {tmp_path / 'blank_3d.png'})")
        time.sleep(1.0)


def chart_texts(page) -> list[str]:
    """The text drawn in each chart of the page (Vega renders SVG: titles, axis titles, legends, labels)."""
    return page.evaluate("""() => Array.from(document.querySelectorAll('[data-testid="stMain"] [data-testid="stVegaLiteChart"]'))
        .map(c => Array.from(c.querySelectorAll('text')).map(t => t.textContent).join(' | '))""")


def chart_with(page, start: str) -> str:
    for text in chart_texts(page):
        if text.startswith(start) or f"| {start}" in text:
            return text
    raise AssertionError(f"no chart titled {start!r}: {[t[:60] for t in chart_texts(page)]}")


def toggle(page, label: str) -> None:
    page.locator('[data-testid="stMain"] [data-testid="stCheckbox"]', has_text=label).first.click()
    settle(page)


def test_first_visit_walks_how_awq_works_and_the_charts_follow_the_toggles(server, browser):
    import ui

    url, analysis, log, cache = server
    (cache / ui.INTRO_MARK).unlink(missing_ok=True)  # a first visit
    ctx = browser.new_context(viewport={"width": 1500, "height": 1100})
    page = ctx.new_page()
    try:
        page.goto(url, timeout=120_000)
        settle(page)
        assert_page_ok(page, "How AWQ works")
        nav = page.locator('[data-testid="stSidebarNav"]').inner_text()
        assert nav.index("Learn") < nav.index("How AWQ works") < nav.index("Explore") < nav.index("Decide")
        steps = page.locator('[data-testid="stMain"] h3').all_inner_texts()
        assert [s.split(" · ")[0].strip() for s in steps[:5]] == ["1", "2", "3", "4", "5"], steps
        assert page.locator('a[href="https://arxiv.org/abs/2306.00978"]').count() >= 1
        walk = how_awq_works.intro_walk(open_entry(analysis.path))
        for start, axis in (("Round to nearest", "input channel (index)"), ("Input activations of", "mean |x_j|"),
                            ("s = mean|x|^α", "scale s_j"), ("Q(W·s)/s vs Q(W)", "channel rank by importance"),
                            ("AWQ gain per layer", "block (index)")):
            assert axis in chart_with(page, start), start
        page.get_by_role("button", name=f"Open the Layer Lab at {walk.name}").click()
        settle(page)
        assert_page_ok(page, "Layer Lab")
        assert lab_summary(page)[0] == walk.name

        text = chart_with(page, "Output error vs alpha")
        assert "RTN (= alpha 0)" in text and "alpha (exponent in s = mean|x|^α)" in text
        toggle(page, "Duo scaling")
        text = chart_with(page, "Output error vs alpha")
        assert "alpha 0 is not RTN" in text and "= alpha 0)" not in text
        toggle(page, "Duo scaling")
        toggle(page, "Clipping")
        if awq.is_clip_skipped(walk.name):  # a Q/K projection (SmolLM2's walk is on a k_proj): official AWQ skips it
            assert "clipping skipped for this Q/K layer" in chart_with(page, "Output error vs alpha")
            toggle(page, "Clip Q/K too")
        text = chart_with(page, "Output error vs alpha")
        assert "+ clip" in text and "without clipping" in text
        page.get_by_role("button", name="Curve with clipping at every alpha").click()
        settle(page)
        text = chart_with(page, "Output error vs alpha")
        assert "with clipping at each alpha" in text and "best α with clipping" in text

        go(page, "Overview")
        text = chart_with(page, "Output error vs bit-width")
        assert "AWQ / RTN error" in text and "bits per weight" in text
    finally:
        ctx.close()
    assert "Traceback" not in log.read_text()
