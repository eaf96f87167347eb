"""Helpers shared by the app tests (AppTest) and the browser test: one cache folder per test session,
the bundled model's default analysis in it, a Streamlit server on a free port, a headless chromium.

Not a test module itself; ``docs/screenshots.py`` uses it too.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Every page of the navigation that exists in this checkout (Methods and Plan arrive from other branches).
PAGES = [p for p in ("pages/how_awq_works.py", "pages/overview.py", "pages/layer_lab.py", "pages/importance_map.py",
                     "pages/clipping.py", "pages/methods.py", "pages/outliers.py", "pages/model_quality.py",
                     "pages/plan.py", "pages/compare.py") if (ROOT / p).exists()]


def navigation_mode(monkeypatch) -> None:
    """Start every AppTest run in navigation mode.

    AppTest builds a fresh PagesManager for every run, and one beside a pages/ folder starts in Streamlit's
    legacy multipage mode, which runs the page file without app.py. The server leaves that mode for good once
    st.navigation has run (ui.page_guard covers its first request); AppTest would re-enter it on every run,
    and the guard's st.rerun() would swallow button clicks."""
    from streamlit.runtime.pages_manager import PagesManager

    original_init = PagesManager.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        PagesManager.uses_pages_directory = False

    monkeypatch.setattr(PagesManager, "__init__", init)


def app_test(monkeypatch, cache: Path, entry_path: Path | str | None = None, timeout: float = 300):
    """An AppTest of app.py on ``cache`` (navigation mode), opened on the analysis at ``entry_path`` if given."""
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("AWQ_EXPLORER_CACHE", str(cache))
    navigation_mode(monkeypatch)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=timeout)
    if entry_path is not None:
        at.session_state["entry_path"] = str(entry_path)
    return at


def shared_cache(tmp_path_factory) -> Path:
    """One cache folder for the whole test session, so the bundled model is analyzed only once."""
    path = tmp_path_factory.getbasetemp() / "app-cache"
    path.mkdir(exist_ok=True)
    return path


def ensure_bundled(cache: Path):
    """The bundled model's default analysis (what a first open of the app computes), cached in ``cache``."""
    from core.analysis import AnalysisSettings, analyze

    return analyze(AnalysisSettings(), cache)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return int(s.getsockname()[1])


@contextmanager
def streamlit_server(cache: Path, log: Path, port: int | None = None) -> Iterator[str]:
    """``streamlit run app.py`` headless on a free localhost port; yields its URL, stops it afterwards."""
    port = port or free_port()
    env = dict(os.environ, AWQ_EXPLORER_CACHE=str(cache), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.port", str(port),
           "--server.headless", "true", "--server.address", "localhost", "--browser.gatherUsageStats", "false"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 90
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"streamlit exited early:\n{log.read_text()[-3000:]}")
                try:
                    socket.create_connection(("localhost", port), timeout=0.5).close()
                    break
                except OSError:
                    if time.time() > deadline:
                        raise RuntimeError(f"streamlit did not start:\n{log.read_text()[-3000:]}") from None
                    time.sleep(0.3)
            yield f"http://localhost:{port}"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def settle(page, timeout: float = 240.0, quiet: float = 1.5) -> None:
    """Wait until the app has rendered and stopped running.

    ``[data-testid="stApp"]`` must exist and, for ``quiet`` seconds in a row, there must be no running
    status widget, no skeleton placeholder and a page title (``h1``).
    """
    page.wait_for_selector('[data-testid="stApp"]', timeout=timeout * 1000)
    js = """() => !document.querySelector('[data-testid="stStatusWidget"]')
                  && !document.querySelector('[data-testid="stSkeleton"]')
                  && !!document.querySelector('[data-testid="stMain"] h1')"""
    deadline = time.time() + timeout
    calm_since = None
    while time.time() < deadline:
        if page.evaluate(js):
            calm_since = calm_since or time.time()
            if time.time() - calm_since >= quiet:
                return
        else:
            calm_since = None
        time.sleep(0.1)
    raise TimeoutError("the app kept running")


def metric_value(page, label: str) -> str:
    """The shown value of the ``st.metric`` whose label is exactly ``label``."""
    return page.evaluate(
        """(label) => {
            for (const m of document.querySelectorAll('[data-testid="stMetric"]')) {
                const l = m.querySelector('[data-testid="stMetricLabel"]');
                if (l && l.innerText.trim() === label)
                    return m.querySelector('[data-testid="stMetricValue"]').innerText.trim();
            }
            return null;
        }""", label)
