"""What every page shares: the model picker (sidebar), the current analysis, running analyses with a
progress bar, readable errors, chart rendering with exports, the layer picker, the 3D view.

Pages stay thin: widgets, one call into ``core``, ``show_figure``. Nothing here computes numbers.
"""
from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import streamlit as st

from core.present import common, model_quality, pack, surface
from core.grids import llamacpp, metrics
from core.analysis import Analysis, AnalysisSettings, analyze, list_cached, open_entry
from core.model.calibration import BUNDLED_TEXT, HUB_TEXTS, CalibrationError, CalibrationSpec, decode_text
from core.model.models import (BUNDLED_MODELS, MINILM, SMOLLM2, ModelLoadError, canonical_model, layer_widths, looks_like_path)
from core.grids.quant import default_group_size, model_group_sizes
from core.model.store import CacheError
from core.studies.sweep import SweepSettings

ROOT = Path(__file__).resolve().parent
SHARED_LAYER = "shared_layer"  # session state: the linear Layer Lab, Clipping, How AWQ works and Methods show
SHARED_BITS = "shared_bits"  # session state: the bit-width every page's bits control starts from
PRESET_KEY = "export_preset"  # session state: "standard" or "talk" (common.PRESETS)
PACK_SECONDS = "about 30 s"  # figure pack of the bundled SmolLM2: 30.2 s measured on 2 shared cores (load 11)
DEFAULTS = AnalysisSettings()  # the bundled model with the CPU-friendly defaults: what a first open analyzes
ENTRY_KEY = "entry_path"  # session state: the cache entry the pages show
MAX_OPEN_ANALYSES = 6  # analyses (and their loaded models) kept in memory for all sessions
# Readable failures: the engine raises these with one sentence meant for the user.
USER_ERRORS = (ModelLoadError, CalibrationError, CacheError, ValueError, KeyError, OSError)


def cache_dir() -> Path:
    """``$AWQ_EXPLORER_CACHE`` or ``<repo>/cache`` (read on every call so tests can point it elsewhere)."""
    return Path(os.environ.get("AWQ_EXPLORER_CACHE") or ROOT / "cache")


def readable(e: BaseException) -> str:
    """One sentence for ``st.error``: the engine's own message, else the exception type and first line."""
    text = " ".join(str(e).split())
    if isinstance(e, KeyError) and text.startswith("'"):
        text = text.strip("'\"")
    if isinstance(e, USER_ERRORS) and text:
        first = text.split(" ", 1)[0]
        if "." in first.rstrip(".,;:") or "_" in first:  # a module or method name keeps its case
            return text
        return text[0].upper() + text[1:]
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


# --- analyses shared by every session ----------------------------------------------------------------

class _Registry:
    """Open analyses by cache path, shared across sessions (their models load once), LRU-bounded.

    ``run_lock`` serialises new analyses: two sessions analysing at once would only fight over two cores.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.run_lock = threading.Lock()
        self.items: OrderedDict[str, Analysis] = OrderedDict()

    def get(self, path: str) -> Analysis:
        with self.lock:
            if path in self.items:
                self.items.move_to_end(path)
                return self.items[path]
        a = open_entry(path)
        self.put(a)
        return a

    def put(self, a: Analysis) -> None:
        with self.lock:
            self.items[str(a.path)] = a
            self.items.move_to_end(str(a.path))
            while len(self.items) > MAX_OPEN_ANALYSES:
                self.items.popitem(last=False)


@st.cache_resource
def registry() -> _Registry:
    return _Registry()


def page_guard() -> None:
    """Make sure the page runs inside ``app.py`` (sidebar, navigation), not alone.

    Streamlit treats a ``pages/`` folder beside the main script as the legacy multipage layout until
    ``st.navigation`` has run once in the process: a first request for a deep link (``/overview``), and
    every AppTest rerun, would execute the page file without ``app.py``. Switch the legacy mode off and
    rerun, so ``app.py`` runs and routes to the same page.
    """
    from streamlit.runtime.pages_manager import PagesManager

    if PagesManager.uses_pages_directory:
        PagesManager.uses_pages_directory = False
        st.rerun()


def current_analysis() -> Analysis | None:
    path = st.session_state.get(ENTRY_KEY)
    if not path:
        return None
    try:
        return registry().get(str(path))
    except USER_ERRORS as e:
        st.session_state.pop(ENTRY_KEY, None)
        st.error(f"The cached analysis could not be opened: {readable(e)}")
        return None


def require_analysis() -> Analysis:
    """The analysis the pages show; stops the page with a hint when there is none."""
    page_guard()
    a = current_analysis()
    if a is None:
        st.info("No model analyzed yet: pick a model and calibration text in the sidebar and press **Analyze**, "
                "or open a cached analysis there.")
        st.stop()
    return a


def run_analysis(settings: AnalysisSettings, *, where: Any = None) -> Analysis | None:
    """Analyze (or reopen from the cache) with a live progress bar; on failure ``st.error``, nothing changes.

    The engine runs in a worker thread while this (the script's) thread redraws the bar four times a second:
    the current stage and the elapsed seconds move from the first second on, also while the model loads
    (a stage without progress callbacks). The fraction is the engine's own, never a guess.
    """
    where = where or st
    m = canonical_model(settings.model)
    label = BUNDLED_MODELS[m].split(" (")[0] if m in BUNDLED_MODELS else settings.model
    state: dict[str, Any] = {"frac": 0.0, "msg": "waiting for another analysis to finish", "result": None,
                             "error": None}

    def progress(frac: float, msg: str) -> None:
        state["frac"], state["msg"] = min(max(float(frac), 0.0), 1.0), msg

    reg, cache = registry(), cache_dir()  # read here: the worker thread has no Streamlit context

    def work() -> None:
        try:
            with reg.run_lock:
                progress(0.0, f"starting: loading {label}")
                state["result"] = analyze(settings, cache, progress=progress)
        except BaseException as e:  # noqa: BLE001 - handed to the script thread, shown as one sentence
            state["error"] = e

    with where.status(f"Analyzing {label}…", expanded=True) as status:
        t0 = time.time()
        bar = st.progress(0.0, text=f"{state['msg']} · 0 s")
        worker = threading.Thread(target=work, name="awq-analysis", daemon=True)
        worker.start()
        while worker.is_alive():
            bar.progress(state["frac"], text=f"{state['msg']} · {time.time() - t0:.0f} s")
            worker.join(0.25)
        e = state["error"]
        if e is not None or state["result"] is None:
            status.update(label=f"Analysis of {label} failed", state="error", expanded=True)
            where.error(readable(e) if e is not None else "the analysis ended without a result")
            return None
        a: Analysis = state["result"]
        bar.progress(1.0, text=f"done · {time.time() - t0:.0f} s")
        status.update(label=f"Ready: {a.model_id} ({time.time() - t0:.1f} s)", state="complete", expanded=False)
    registry().put(a)
    st.session_state[ENTRY_KEY] = str(a.path)
    return a


INTRO_MARK = ".intro_seen"  # in the cache folder: the first-visit walk has been shown once
START_KEY = "start_page"


def start_page() -> str:
    """The page a session opens on: "How AWQ works" until it has been shown once, then the Layer Lab.

    Decided on a session's first run and kept for the session (the default page is the app's root URL,
    which must not change under a user's feet).
    """
    if START_KEY not in st.session_state:
        seen = (cache_dir() / INTRO_MARK).exists()
        st.session_state[START_KEY] = "layer_lab" if seen else "how_awq_works"
    return str(st.session_state[START_KEY])


def mark_intro_seen() -> None:
    """Remember (in the cache folder) that the walk has been shown, so later visits open on the Layer Lab."""
    path = cache_dir() / INTRO_MARK
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("the How AWQ works walk was shown once; delete this file to start there again\n")
    except OSError:
        pass  # a read-only cache: the walk is simply offered again next time


def ensure_analysis() -> None:
    """First open of a session: show the bundled model without the user typing anything.

    Analyzes it once with the default settings (progress bar; a few tens of seconds on a CPU), then
    every later open reads the cache instantly.
    """
    if st.session_state.get(ENTRY_KEY) or st.session_state.get("auto_analysis_failed"):
        return
    holder = st.empty()  # a placeholder, so the finished status can be removed again
    if run_analysis(DEFAULTS, where=holder.container()) is None:
        st.session_state["auto_analysis_failed"] = True
    else:
        holder.empty()


# --- sidebar -------------------------------------------------------------------------------------------

def entry_label(m: dict[str, Any]) -> str:
    s = m.get("settings", {})
    cal, sw = s.get("calibration", {}), s.get("sweep", {})
    src = str(cal.get("source", "?"))
    src = src if src in (BUNDLED_TEXT, *HUB_TEXTS) else Path(src).name
    model = str(m.get("model_id", "?")).rstrip("/").split("/")[-1]
    g = sw.get("group_size")
    return (f"{model} · {src} {cal.get('n_samples')}x{cal.get('seqlen')} · "
            f"w{','.join(str(b) for b in sw.get('bits', []))} g{g if g else 'row'} · "
            f"{str(m.get('created', ''))[:16].replace('T', ' ')} [{Path(m['path']).name[:6]}]")


def _open_cached(path: str) -> None:
    try:
        registry().get(path)
    except USER_ERRORS as e:
        st.session_state["sidebar_error"] = f"Could not open that cached analysis: {readable(e)}"
        return
    st.session_state[ENTRY_KEY] = path


def _save_upload(data: bytes, name: str) -> str:
    """Keep an uploaded calibration text beside the cache so the analysis can be reproduced later."""
    text = decode_text(data, f"the uploaded file {name!r}")  # raises CalibrationError when empty / binary
    digest = hashlib.sha256(data).hexdigest()[:16]
    folder = cache_dir() / ".uploads"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{digest}.txt"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    return str(path)


MODEL_SOURCES = {"bundled": "SmolLM2-135M-Instruct (bundled LLM, offline)",
                 MINILM: "MiniLM-L6 (bundled encoder, offline)", "gguf": "Local GGUF file",
                 "hub": "Hugging Face id", "folder": "Local folder"}
TEXT_SOURCES = {BUNDLED_TEXT: "Bundled: Python's documentation (offline)", "upload": "Upload a text file",
                "wikitext-2": "wikitext-2 (needs the hub)", "pile-val": "pile-val (needs the hub)"}
GROUP_CHOICES = ["auto", 32, 64, 128, 256, 0]
GROUP_HELP = ("Weights per quantization group along the input. 'auto': the largest of 128, 64, 32 that divides "
              "every layer's input width (SmolLM2: 64, MiniLM: 128). A size that does not divide every layer is "
              "refused, here, in the Layer Lab and in Model quality alike.")


def group_label(g: int | str) -> str:
    if g == "auto":
        return "auto"
    return "per row" if int(g) <= 0 else str(g)


def _settings_from_sidebar(values: dict[str, Any]) -> AnalysisSettings:
    """Turn the sidebar's values into settings; raises a ValueError subclass with one sentence.

    An upload is kept under ``<cache>/.uploads/`` (by content hash) and becomes the calibration source,
    so the analysis (and the model-quality run, which re-reads the text) can be reproduced.
    """
    kind = values["model_kind"]
    if kind == "bundled":
        model = SMOLLM2
    elif kind == MINILM:
        model = MINILM
    elif kind == "gguf":
        raw = (values.get("gguf") or "").strip()
        if not raw:
            raise ModelLoadError("type the path of a local .gguf file")
        model = str(Path(raw).expanduser().resolve())
        if not model.lower().endswith(".gguf"):
            raise ModelLoadError(f"{raw!r} does not end in .gguf; pick 'Local folder' for a transformers folder")
        if not Path(model).is_file():
            raise ModelLoadError(f"GGUF file {raw!r} does not exist")
    elif kind == "hub":
        model = values["hub_id"].strip()
        if not model:
            raise ModelLoadError("type a Hugging Face model id, e.g. Qwen/Qwen2.5-0.5B")
    else:
        raw = values["folder"].strip()
        if not raw:
            raise ModelLoadError("type the path of a local model folder (with config.json and .safetensors)")
        model = str(Path(raw).expanduser().resolve()) if looks_like_path(raw) else raw
        if not Path(model).expanduser().exists():
            raise ModelLoadError(f"model folder {raw!r} does not exist")
    tok = (values.get("tokenizer") or "").strip()
    source = values["text_source"]
    if source == "upload":
        up = values.get("upload")
        if up is None:
            raise CalibrationError("choose a text file to upload, or pick another calibration text")
        source = _save_upload(up.getvalue(), up.name)
    if not values["bits"]:
        raise ValueError("pick at least one bit-width to sweep")
    cal = CalibrationSpec(source=source, n_samples=int(values["n_samples"]), seqlen=int(values["seqlen"]),
                          heldout_samples=int(values["heldout_samples"]))
    group = values["group_size"]
    if group == "auto":  # from the layer widths (config or GGUF header; nothing is converted or loaded here)
        group = default_group_size(layer_widths(model, cache_dir=cache_dir(),
                                                trust_remote_code=bool(values["trust_remote_code"]),
                                                revision=(values.get("revision") or "").strip() or None))
    sweep = SweepSettings(bits=tuple(sorted(int(b) for b in values["bits"])), group_size=int(group),
                          zero_point=bool(values["zero_point"]), n_grid=DEFAULTS.sweep.n_grid)
    settings = AnalysisSettings(model=model, dtype=values["dtype"], device=values["device"],
                                trust_remote_code=bool(values["trust_remote_code"]),
                                revision=(values.get("revision") or "").strip() or None,
                                tokenizer=str(Path(tok).expanduser().resolve()) if tok else None,
                                calibration=cal, sweep=sweep)
    return settings


def render_sidebar() -> None:
    """Current model, cached analyses to reopen, and the form for a new analysis (with its Analyze button)."""
    sb = st.sidebar
    a = current_analysis()
    if a is not None:
        sw = a.settings.sweep
        cal = a.settings.calibration
        src = cal.source if cal.source in (BUNDLED_TEXT, *HUB_TEXTS) else Path(cal.source).name
        sb.markdown(f"**{a.model_id}**")
        sb.caption(f"{a.manifest.get('n_tokens')} calibration tokens ({src}) · bits "
                   f"{', '.join(str(b) for b in sw.bits)} · group {group_label(sw.group_size)} · "
                   f"{'asymmetric' if sw.zero_point else 'symmetric'} · {a.settings.dtype}")
        if a.source_formats:  # a GGUF source: its weights were already quantized by llama.cpp
            sb.caption("Stored as " + ", ".join(f"{k} ({n} linears)" for k, n in a.source_formats.items()) + ".",
                       help=a.source_note)
        swept = common.bits_available(a)
        pack_bits = st.session_state.get(SHARED_BITS)
        pack_bits = int(pack_bits) if pack_bits in swept else common.default_bits(a)
        layer = st.session_state.get(SHARED_LAYER)
        layer = layer if layer in a.names else None
        preset = export_preset()
        sb.download_button(
            f"Figure pack (ZIP, w{pack_bits})",
            data=lambda: pack.figure_pack(a, pack_bits, layer=layer, preset=preset),
            file_name=f"awq_explorer_{common.slugify_model(a.model_id)}_w{pack_bits}"
                      f"{'_talk' if preset == 'talk' else ''}.zip", mime="application/zip",
            on_click="ignore", key="figure_pack", icon=":material/folder_zip:", width="stretch",
            help="The standard figures of this model as PNG, SVG, PDF and CSV, plus 3D surfaces and a README; "
                 f"the layer figures show {layer or 'the layer AWQ helps most'}. Built when clicked: "
                 f"{PACK_SECONDS} for the bundled model on two CPU cores.")
        sb.radio("Chart downloads", list(common.PRESETS), key=PRESET_KEY, format_func=common.PRESETS.get,
                 help="The size of every PNG / SVG / PDF download and of the figure pack. Talk: one chart "
                      "per 16:9 slide, 1920 x 1080 px, fonts about twice as large.")

    entries = list_cached(cache_dir())
    if entries:
        with sb.expander(f"Cached analyses ({len(entries)})", expanded=False):
            labels = dict(zip((m["path"] for m in entries), common.compare_labels(entries)))
            paths = list(labels)
            cur = str(a.path) if a is not None else None
            pick = st.selectbox("Cached analysis", paths, index=paths.index(cur) if cur in paths else 0,
                                format_func=labels.get, key="cached_pick", label_visibility="collapsed")
            st.button("Open", key="open_cached", on_click=_open_cached, args=(pick,),
                      disabled=pick == cur, width="stretch")

    with sb.expander("New analysis", expanded=a is None):
        v: dict[str, Any] = {}
        v["model_kind"] = st.radio("Model", list(MODEL_SOURCES), format_func=MODEL_SOURCES.get, key="src_kind")
        if v["model_kind"] == "hub":
            v["hub_id"] = st.text_input("Hugging Face id", placeholder="Qwen/Qwen2.5-0.5B", key="src_hub")
            v["revision"] = st.text_input("Revision (optional)", key="src_rev")
        elif v["model_kind"] == "gguf":
            v["gguf"] = st.text_input("GGUF file", placeholder="/path/to/model.Q4_K_M.gguf", key="src_gguf",
                                      help="A llama.cpp GGUF of any architecture transformers can load; converted "
                                           "once to float32 safetensors under the cache (tens of seconds).")
        elif v["model_kind"] == "folder":
            v["folder"] = st.text_input("Model folder", placeholder="/path/to/model", key="src_folder",
                                        help="A transformers folder with config.json and .safetensors weights.")
            v["tokenizer"] = st.text_input("Tokenizer folder (if the model folder has none)", key="src_tok")
        v["text_source"] = st.selectbox("Calibration text", list(TEXT_SOURCES), format_func=TEXT_SOURCES.get,
                                        key="cal_source")
        if v["text_source"] == "upload":
            v["upload"] = st.file_uploader("UTF-8 text file", type=["txt", "md", "text"], key="cal_upload")
        # two inputs per row at most: three squeezed labels ("Held-out", "Zero point") were cut in the sidebar
        c1, c2 = st.columns(2)
        v["n_samples"] = c1.number_input("Blocks", 1, 1024, DEFAULTS.calibration.n_samples, key="cal_n",
                                         help="Calibration blocks (official AWQ: 128).")
        v["seqlen"] = c2.number_input("Tokens", 16, 4096, DEFAULTS.calibration.seqlen, step=16, key="cal_len",
                                      help="Tokens per block, capped at the model's positions (official AWQ: 512).")
        c1, c2 = st.columns(2)
        v["heldout_samples"] = c1.number_input("Held-out", 1, 256, DEFAULTS.calibration.heldout_samples, key="cal_held",
                                               help="Held-out blocks, scored but never used to choose alpha.")
        v["group_size"] = c2.selectbox("Group size", GROUP_CHOICES, index=0, format_func=group_label, key="q_group",
                                       help=GROUP_HELP)
        v["bits"] = st.multiselect("Bits to sweep", list(range(2, 9)), default=list(DEFAULTS.sweep.bits), key="q_bits")
        v["zero_point"] = st.toggle("Zero point", DEFAULTS.sweep.zero_point, key="q_zp",
                                    help="Asymmetric quantization with a zero point (official AWQ); off: symmetric.")
        c1, c2 = st.columns(2)
        v["dtype"] = c1.selectbox("dtype", ["float32", "bfloat16", "float16"], key="m_dtype")
        v["device"] = c2.selectbox("Device", ["cpu", "cuda", "auto"], key="m_device")
        v["trust_remote_code"] = st.checkbox(
            "Trust remote code", value=False, key="m_trust",
            help="Lets the model repository run its own Python code on this machine. Off by default; "
                 "tick it only for a repository you trust.")
        if v["trust_remote_code"]:
            st.warning("The model's repository code will run on this machine.")
        go = st.button("Analyze", type="primary", key="analyze", width="stretch", icon=":material/play_arrow:")
    if go:
        try:
            settings = _settings_from_sidebar(v)
        except USER_ERRORS as e:
            sb.error(readable(e))
        else:
            run_analysis(settings, where=sb)
    if st.session_state.get("sidebar_error"):
        sb.error(st.session_state.pop("sidebar_error"))


# --- charts and exports --------------------------------------------------------------------------------

EXPORT_MIME = {"png": "image/png", "svg": "image/svg+xml", "pdf": "application/pdf", "csv": "text/csv"}


def show_figure(fig: common.Figure, key: str, *, model_id: str = "", caption: bool = False) -> None:
    """The chart (exactly its own theme: ``theme=None``) and PNG / SVG / PDF / CSV downloads under it.

    Downloads are generated only when clicked (deferred), so dragging a slider never waits on exports.
    """
    st.altair_chart(fig.chart, theme=None, width="content", key=f"chart_{key}")
    preset = export_preset()
    stem = f"{common.slugify_model(model_id)}_{fig.slug}" if model_id else fig.slug
    makers: dict[str, Callable[[], Any]] = {"png": lambda: fig.png(preset=preset), "svg": lambda: fig.svg(preset),
                                            "pdf": lambda: fig.pdf(preset), "csv": fig.csv}
    if preset == "talk":
        stem += "_talk"
    cols = st.columns([1, 1, 1, 1, 3], gap="small")
    for col, (fmt, make) in zip(cols, makers.items()):
        col.download_button(fmt.upper(), data=make, file_name=f"{stem}.{fmt}", mime=EXPORT_MIME[fmt],
                            on_click="ignore", key=f"dl_{key}_{fmt}", type="tertiary",
                            icon=":material/download:",
                            help=f"Download as {fmt.upper()}" + (" (talk: 16:9, 1920 x 1080)" if preset == "talk" and fmt != "csv" else ""))
    if caption and fig.caption:
        st.caption(fig.caption)


# Labels and number formats of the summary columns that several pages show: one place, same wording everywhere.
TABLE_COLUMNS: dict[str, tuple[str, str | None]] = {
    "median_rtn_rel": ("median RTN rel. error", "%.4g"),
    "median_awq_rel": ("median AWQ rel. error", "%.4g"),
    "mean_gain": ("mean gain", "%.3f"),
    "median_gain": ("median gain", "%.3f"),
    "median_gain_heldout": ("median gain, held-out", "%.3f"),
    "mean_best_alpha": ("mean best alpha", "%.2f"),
    "mean_top1_share": ("top-1% importance share", "%.3f"),
    "max_kurtosis": ("max kurtosis", "%.1f"),
    "max_mean_abs_over_median": ("max mean|x| / median", "%.1f"),
}


def show_table(df: pd.DataFrame, **columns: tuple[str, str | None]) -> None:
    """``st.dataframe`` with the shared column labels/formats; ``columns`` adds or overrides (label, format)."""
    spec = {**TABLE_COLUMNS, **columns}
    st.dataframe(df, hide_index=True, column_config={
        c: st.column_config.NumberColumn(label, format=fmt) for c, (label, fmt) in spec.items() if c in df.columns})


def definitions(keys: list[str] | None = None) -> None:
    """The metric definitions from ``core.metrics`` (the one place they are written)."""
    with st.expander("Definitions"):
        for k, text in metrics.DEFINITIONS.items():
            if keys is None or k in keys:
                st.markdown(f"- **{k}**: {text}")


def export_preset() -> str:
    """The download size chosen in the sidebar: ``standard`` or ``talk``."""
    p = st.session_state.get(PRESET_KEY)
    return p if p in common.PRESETS else "standard"


def _share(widget_key: str, shared_key: str) -> None:
    st.session_state[shared_key] = st.session_state.get(widget_key)


def bits_picker(a: Analysis | None, key: str, label: str = "Bits", options: list[int] | None = None) -> int:
    """The one bits control of every page (w2 … w8 buttons), starting from the bit-width last picked anywhere.

    ``options``: the bit-widths this page can show (default: the swept ones of ``a``).
    """
    bits = list(options) if options is not None else common.bits_available(a)
    shared = st.session_state.get(SHARED_BITS)
    if shared in bits and st.session_state.get(key) != shared:
        st.session_state[key] = shared
    elif st.session_state.get(key) not in bits:
        default = common.default_bits(a) if a is not None else 3
        st.session_state[key] = default if default in bits else bits[0]
    value = int(st.segmented_control(label, bits, key=key, format_func=lambda b: f"w{b}", required=True,
                                     on_change=_share, args=(key, SHARED_BITS)))
    st.session_state[SHARED_BITS] = value
    return value


GRID_KINDS = {"integer": "integer grid", "llama.cpp": "llama.cpp type"}


def grid_kind_picker(key: str) -> bool:
    """Integer grid (bits / group size / zero point) or a llama.cpp type: True for a llama.cpp type."""
    if st.session_state.get(key) not in GRID_KINDS:
        st.session_state[key] = "integer"
    kind = st.segmented_control("Grid", list(GRID_KINDS), key=key, format_func=GRID_KINDS.get, required=True,
                                help="The explorer's integer grid (llm-awq's quantizer: bits, group size, zero "
                                     "point) or one of llama.cpp's types, rounded byte for byte as llama-quantize "
                                     "rounds it (blocks of 32, k-quants in super-blocks of 256).")
    return kind == "llama.cpp"


def type_picker(key: str, label: str = "llama.cpp type") -> str:
    """One llama.cpp type (``core.grids.llamacpp.TYPES``), labelled with its bits per weight."""
    if st.session_state.get(key) not in llamacpp.TYPES:
        st.session_state[key] = "Q4_0"
    return str(st.selectbox(label, llamacpp.TYPES, key=key,
                            format_func=lambda t: f"{t} · {llamacpp.bits_per_weight(t):g} bits/weight",
                            help="Bits per weight from the block layout (levels, scales and minimums). Where the "
                                 "type's block does not divide a row, llama.cpp stores another type; the page says "
                                 "which."))


def with_progress(label: str, failed: str, done: str, work: Callable[[Callable[[float, str], None]], Any]) -> Any:
    """``work(progress)`` inside a status box with a progress bar; its result, or None after showing the error as
    one sentence (the page stays usable)."""
    with st.status(label, expanded=True) as status:
        bar = st.progress(0.0, text="starting")
        try:
            out = work(lambda f, msg: bar.progress(min(max(float(f), 0.0), 1.0), text=msg))
        except Exception as e:  # noqa: BLE001 - shown as a sentence; the page stays usable
            status.update(label=failed, state="error", expanded=False)
            why = readable(e)
        else:
            status.update(label=done, state="complete", expanded=False)
            return out
    st.error(why)  # under the status box, not inside it: a collapsed box would hide the sentence
    return None


def export_button(a: Analysis, key: str, label: str, running: str, done: str, *, format: str, folder: str,
                  download: bool = False, **kwargs: Any) -> dict | None:
    """A button that writes an export (``core.studies.export.export(a, format=..., **kwargs)`` into a new folder
    ``<entry>/exports/<folder>-<time>``) with a progress bar, then, on every run, this key's last export of this
    analysis (``show_export``; kept in session state as ``<key>_summary``). Returns that summary, or None."""
    if st.button(label, key=key, icon=":material/save:"):
        from core.studies import export as ex

        out = with_progress(running, "Export failed", done, lambda progress: ex.export(
            a, format=format, out=model_quality.export_folder(a, folder), progress=progress, **kwargs))
        if out is not None:
            st.session_state[f"{key}_summary"] = out
    summary = st.session_state.get(f"{key}_summary")
    if not (summary and summary.get("folder", "").startswith(str(a.path))):
        return None
    show_export(summary, key, download=download)
    return summary


def show_export(summary: dict, key: str, *, download: bool = False) -> None:
    """What an export wrote and how its runtime read it back (GGUF: llama.cpp; compressed-tensors: transformers):
    where the folder is, the agreement between the runtime's logits and the explorer's (with the tolerance), each
    metric against fp from both, the exporter's notes; ``download``: a download button for a GGUF file."""
    st.caption(model_quality.export_caption(summary))
    v = summary.get("verify") or {}
    if v:
        if "max_logit_diff" in v:  # a reloaded checkpoint: the two models' logits side by side
            m = st.columns(3)
            m[0].metric("max |Δlogit|", f"{v['max_logit_diff']:.3g}",
                        help="Largest difference between the explorer's and the reloaded model's logits.")
            m[1].metric("mean KL (explorer ‖ reloaded)", f"{v['mean_kl']:.3g} nats")
            m[2].metric("same top token", f"{v['same_top']:.2%}")
        (st.success if v.get("ok", True) else st.warning)(
            f"{v.get('runtime', model_quality.runtime_label(summary))} on {v.get('n_tokens', 0):,} held-out tokens "
            f"({v.get('protocol')}): {v.get('agreement', '')}. Tolerance: {v.get('tolerance', '')}.")
        show_table(model_quality.verification_table(summary),
                   **{c: (c, "%.5g") for c in (model_quality.runtime_label(summary), "explorer", "difference")})
    for note in summary.get("notes", []):
        st.markdown(f"- {note}")
    path = Path(summary["folder"]) / "model.gguf"
    if download and path.is_file():
        st.download_button("model.gguf", data=path.read_bytes(), file_name=f"{Path(summary['folder']).name}.gguf",
                           key=f"{key}_dl", icon=":material/download:")


def layer_label(a: Analysis, name: str) -> str:
    info = a.info(name)
    return f"{name}  ·  {info['family']}  ·  {info['in_features']}→{info['out_features']}"


def layer_picker(a: Analysis, key: str, default: str | None = None, label: str = "Layer") -> str:
    """The layer selectbox of Layer Lab, Clipping, How AWQ works and Methods: one selection shared by all.

    Picking a layer on one page shows the same layer on the others (``SHARED_LAYER`` in session state);
    ``default`` (else the layer where AWQ helps most) applies until a layer has been picked.
    """
    names = a.names
    shared = st.session_state.get(SHARED_LAYER)
    if shared in names and st.session_state.get(key) != shared:
        st.session_state[key] = shared
    elif st.session_state.get(key) not in names:
        default = default or common.best_layer(a, common.default_bits(a))
        st.session_state[key] = default if default in names else names[0]
    name = str(st.selectbox(label, names, key=key, format_func=lambda n: layer_label(a, n),
                            on_change=_share, args=(key, SHARED_LAYER)))
    st.session_state[SHARED_LAYER] = name
    return name


def open_layer_lab(name: str) -> None:
    """Jump to the Layer Lab showing ``name`` (button callback: sets the shared layer, then switches page)."""
    st.session_state[SHARED_LAYER] = name
    st.session_state.pop("lab_alpha", None)  # start from the layer's best alpha


def group_picker(a: Analysis, name: str, key: str, label: str = "Group size") -> int:
    """Group sizes valid for the whole model (they must divide every layer's input width, the rule analyze and
    Model quality apply too); 0 = one group per row."""
    options = model_group_sizes(int(w) for w in a.linears["in_features"])
    if st.session_state.get(key) not in options:
        g = a.settings.sweep.group_size if a.settings.sweep.group_size > 0 else 0
        st.session_state[key] = g if g in options else (a.default_group_size if a.default_group_size in options
                                                        else options[0])
    return int(st.select_slider(label, options, key=key, format_func=group_label,
                                help="Only sizes that divide every layer of this model (as analyze and Model "
                                     f"quality require); this model's default is {group_label(a.default_group_size)}."))


def sweep_row(a: Analysis, name: str, bits: int) -> pd.Series | None:
    lay = a.layers[(a.layers["name"] == name) & (a.layers["bits"] == bits)]
    return None if lay.empty else lay.iloc[0]


# --- 3D view -------------------------------------------------------------------------------------------

_HTML_CACHE: OrderedDict[str, str] = OrderedDict()
_HTML_LOCK = threading.Lock()


def _inline_panel_html(plotter: Any, **backend_kwargs: Any) -> str:
    """stpyvista's panel builder, but with every script inlined: the 3D view works without a network.

    stpyvista's own builder saves panel's HTML with CDN links, so offline the iframe stays blank.
    The result is cached by ``plotter._awq_cache_key`` (serialising the scene takes about a second).
    """
    import panel as pn
    from bokeh.resources import INLINE

    key = getattr(plotter, "_awq_cache_key", None)
    with _HTML_LOCK:
        if key is not None and key in _HTML_CACHE:
            _HTML_CACHE.move_to_end(key)
            return _HTML_CACHE[key]
    use_container_width = backend_kwargs.pop("use_container_width", False)
    width, height = plotter.window_size
    backend_kwargs["height"] = height
    if not use_container_width:
        backend_kwargs["width"] = width
    pn.extension("vtk")
    pane = pn.pane.VTK(plotter.ren_win, **backend_kwargs)
    import io

    with io.StringIO() as buf:
        pane.save(buf, title="AWQ Explorer 3D view", resources=INLINE)
        html = buf.getvalue()
    if key is not None:
        with _HTML_LOCK:
            _HTML_CACHE[key] = html
            while len(_HTML_CACHE) > 8:
                _HTML_CACHE.popitem(last=False)
    return html


def show_surface(mat: Any, *, title: str, value_name: str, log: bool, cache_key: str, key: str,
                 height: int = 520) -> None:
    """The interactive 3D surface (pyvista + stpyvista, panel backend, scripts inlined)."""
    import stpyvista  # only inside a running app: the package registers a component at import

    stpyvista._panel_html = _inline_panel_html  # the module looks this name up at call time
    with surface.VTK_LOCK:  # VTK objects are built and serialised by one session at a time
        with _HTML_LOCK:
            cached = cache_key in _HTML_CACHE
        if cached:  # the scene's HTML is ready: stpyvista only needs a plotter of the same size
            plotter = surface.pyvista_module().Plotter(off_screen=True, window_size=[960, height])
        else:
            plotter = surface.surface_plotter(mat, title=title, value_name=value_name, log=log,
                                              window_size=(960, height), with_bounds=False)
        plotter._awq_cache_key = cache_key
        try:
            stpyvista.stpyvista(plotter, backend="panel", key=key,
                                backend_kwargs={"axes": surface.surface_axes(mat, log), "orientation_widget": True})
        finally:
            plotter.close()
    st.altair_chart(surface.colour_bar(mat, value_name, log).chart, theme=None, width="content", key=f"{key}_bar")
