"""AWQ Explorer: ``streamlit run app.py``.

Page config, the sidebar (model + calibration picker, Analyze with progress) and navigation over the
pages in ``pages/``, grouped as Learn / Explore / Decide. A first open analyzes the bundled model (cached
afterwards), so every page works on a fresh machine without network and without typing anything; a first
visit starts on "How AWQ works" (skippable), later visits on the Layer Lab.
"""
import os
from pathlib import Path

# Headless 3D rendering through EGL (no X11); must be set before VTK creates a render window.
os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")

import streamlit as st  # noqa: E402

import ui  # noqa: E402

st.set_page_config(page_title="AWQ Explorer", page_icon=":material/biotech:", layout="wide")

HERE = Path(__file__).resolve().parent
start = ui.start_page()  # "how_awq_works" on a first visit, else "layer_lab"; fixed for the session


def page(path: str, title: str, icon: str):
    """An ``st.Page`` for ``pages/<path>``, or None while that page is not part of this build."""
    if not (HERE / path).exists():
        return None
    return st.Page(path, title=title, icon=icon, default=Path(path).stem == start)


GROUPS = {
    "Learn": [page("pages/how_awq_works.py", "How AWQ works", ":material/school:")],
    "Explore": [page("pages/overview.py", "Overview", ":material/dashboard:"),
                page("pages/layer_lab.py", "Layer Lab", ":material/tune:"),
                page("pages/importance_map.py", "Importance map", ":material/landscape:"),
                page("pages/clipping.py", "Clipping", ":material/content_cut:"),
                page("pages/methods.py", "Methods", ":material/leaderboard:"),
                page("pages/outliers.py", "Outliers", ":material/flare:")],
    "Decide": [page("pages/model_quality.py", "Model quality", ":material/fact_check:"),
               page("pages/plan.py", "Plan", ":material/stacked_bar_chart:"),
               page("pages/compare.py", "Compare", ":material/compare_arrows:")],
}

nav = st.navigation({group: [p for p in pages if p is not None] for group, pages in GROUPS.items()})
st.sidebar.title("AWQ Explorer")
ui.ensure_analysis()
ui.render_sidebar()
nav.run()
