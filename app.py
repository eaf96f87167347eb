"""AWQ Explorer: ``streamlit run app.py``.

Page config, the sidebar (model + calibration picker, Analyze with progress) and navigation over the
pages in ``pages/``. A first open analyzes the bundled model (cached afterwards), so the Layer Lab works
on a fresh machine without network and without typing anything.
"""
import os

# Headless 3D rendering through EGL (no X11); must be set before VTK creates a render window.
os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")

import streamlit as st  # noqa: E402

import ui  # noqa: E402

st.set_page_config(page_title="AWQ Explorer", page_icon=":material/biotech:", layout="wide")

PAGES = [
    st.Page("pages/overview.py", title="Overview", icon=":material/dashboard:"),
    st.Page("pages/layer_lab.py", title="Layer Lab", icon=":material/tune:", default=True),
    st.Page("pages/importance_map.py", title="Importance map", icon=":material/landscape:"),
    st.Page("pages/clipping.py", title="Clipping", icon=":material/content_cut:"),
    st.Page("pages/methods.py", title="Methods", icon=":material/leaderboard:"),
    st.Page("pages/compare.py", title="Compare", icon=":material/compare_arrows:"),
    st.Page("pages/model_quality.py", title="Model quality", icon=":material/fact_check:"),
    st.Page("pages/plan.py", title="Plan", icon=":material/stacked_bar_chart:"),
]

page = st.navigation(PAGES)
st.sidebar.title("AWQ Explorer")
ui.ensure_analysis()
ui.render_sidebar()
page.run()
