"""How long a Layer Lab slider release takes: ``python3 docs/measure_layer_lab.py [--cache DIR] [--qwen-layers N]``.

1. The bundled model (MiniLM-L6): ``Analysis.evaluate_layer`` on the Lab's opening layer and on the widest
   linear, for a new alpha (what an alpha release recomputes), a new bit-width / group size (the curve is
   recomputed), with clipping, and the first call (model load + curve).
2. A Qwen2.5-0.5B-shaped model with random weights (hidden 896, intermediate 4864, 14 heads, 2 KV heads,
   vocab 151936; ``--qwen-layers`` blocks, 2 by default: only one linear is timed, its shape is what
   matters), analyzed in memory on the bundled text with the bundled BERT tokenizer (token ids only
   feed the embedding), then the same timings on its largest linears (``up_proj`` / ``down_proj``).
3. The Layer Lab page itself: one AppTest rerun after moving the alpha slider (AppTest reruns the whole
   script), and in headless chromium (``--browser``): from releasing the dragged alpha slider to the new
   AWQ error on screen (a fragment rerun: evaluate_layer, metrics, four chart specs, websocket, render).

Times are wall-clock medians of ``--repeat`` calls on this machine's CPU (torch threads as set).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def timed(fn, repeat: int) -> tuple[float, float]:
    """(first call, median of the next ``repeat`` calls) in milliseconds."""
    t0 = time.perf_counter()
    fn(0)
    first = (time.perf_counter() - t0) * 1000
    runs = []
    for i in range(1, repeat + 1):
        t0 = time.perf_counter()
        fn(i)
        runs.append((time.perf_counter() - t0) * 1000)
    return first, statistics.median(runs)


def measure_layer(a, name: str, repeat: int, bits: int = 3, group: int = 128) -> dict[str, float]:
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    a.evaluate_layer(name, alpha=0.5, bits=bits, group_size=group)
    out["first call (weights + curve)"] = (time.perf_counter() - t0) * 1000
    alphas = [0.11 + 0.07 * i for i in range(repeat + 1)]  # never on the grid: a real new alpha each time
    _, out["new alpha"] = timed(lambda i: a.evaluate_layer(name, alpha=alphas[i], bits=bits, group_size=group), repeat)
    widths = [b for b in (2, 4, 5, 6, 7, 8) if b != bits]
    _, out["new bits (curve recomputed)"] = timed(
        lambda i: a.evaluate_layer(name, alpha=0.5, bits=widths[i % len(widths)], group_size=group), min(repeat, 5))
    _, out["new alpha, clipping on"] = timed(
        lambda i: a.evaluate_layer(name, alpha=alphas[i], bits=bits, group_size=group, clip=True), min(repeat, 3))
    return out


def report(title: str, rows: dict[str, float]) -> None:
    print(f"\n{title}")
    for k, v in rows.items():
        print(f"  {k:<32} {v:8.0f} ms")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=None, help="cache folder (default: a temporary one)")
    ap.add_argument("--qwen-layers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--skip-qwen", action="store_true")
    ap.add_argument("--skip-apptest", action="store_true")
    ap.add_argument("--browser", action="store_true", help="also time slider releases in headless chromium")
    args = ap.parse_args()

    import torch

    from app_harness import ensure_bundled
    from core.present import common

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    cache = Path(args.cache or tempfile.mkdtemp(prefix="awq-measure-"))
    t0 = time.perf_counter()
    a = ensure_bundled(cache)
    print(f"bundled analysis ready in {time.perf_counter() - t0:.1f} s ({a.path})")
    opening = common.best_layer(a, common.default_bits(a))
    widest = max(a.names, key=lambda n: int(a.info(n)["in_features"]) * int(a.info(n)["out_features"]))
    report(f"bundled MiniLM-L6, opening layer {opening} (w3 g128)", measure_layer(a, opening, args.repeat))
    if widest != opening:
        report(f"bundled MiniLM-L6, {widest} (w3 g128)", measure_layer(a, widest, args.repeat))

    if not args.skip_qwen:
        import transformers as tf

        from core.analysis import AnalysisSettings, analyze
        from core.model.calibration import CalibrationSpec, load_text
        from core.model.models import bundled_path, wrap_model
        from core.studies.sweep import SweepSettings

        cfg = tf.Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=args.qwen_layers,
                             num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                             max_position_embeddings=2048, architectures=["Qwen2ForCausalLM"], tie_word_embeddings=True)
        torch.manual_seed(0)
        model = tf.AutoModelForCausalLM.from_config(cfg).eval()
        tok = tf.AutoTokenizer.from_pretrained(str(bundled_path()))
        lm = wrap_model(model, tok)
        settings = AnalysisSettings(calibration=CalibrationSpec(n_samples=8, seqlen=256, heldout_samples=2),
                                    sweep=SweepSettings(bits=(3,), group_size=128))
        t0 = time.perf_counter()
        q = analyze(settings, cache, lm=lm, text=load_text("bundled"))
        print(f"\nQwen2.5-0.5B-shaped random model ({args.qwen_layers} blocks) analyzed in "
              f"{time.perf_counter() - t0:.1f} s; kept sample {tuple(q.inputs(q.names[0]).shape)} rows")
        for suffix in ("mlp.up_proj", "mlp.down_proj"):
            name = next(n for n in q.names if n.endswith(suffix) and n.startswith("model.layers.0."))
            info = q.info(name)
            report(f"Qwen2.5-0.5B shape, {name} [{info['out_features']} x {info['in_features']}] (w3 g128)",
                   measure_layer(q, name, args.repeat))

    if not args.skip_apptest:
        from streamlit.runtime.pages_manager import PagesManager
        from streamlit.testing.v1 import AppTest

        os.environ["AWQ_EXPLORER_CACHE"] = str(cache)
        original = PagesManager.__init__

        def init(self, *a_, **k_):  # see tests/test_app.py: stay in st.navigation mode between runs
            original(self, *a_, **k_)
            PagesManager.uses_pages_directory = False

        PagesManager.__init__ = init
        at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=600)
        at.session_state["entry_path"] = str(a.path)
        at.run()
        runs = []
        for i in range(args.repeat):
            at.slider(key="lab_alpha").set_value(round(0.13 + 0.09 * i, 2))
            t0 = time.perf_counter()
            at.run()
            runs.append((time.perf_counter() - t0) * 1000)
        assert not at.exception, [e.value for e in at.exception]
        report("AppTest: Layer Lab script rerun after an alpha change (bundled model)",
               {"median": statistics.median(runs), "min": min(runs)})
    if args.browser:
        report("chromium: alpha slider release -> new AWQ error shown (bundled model)", browser_release(cache, args.repeat))
    return 0


def browser_release(cache: Path, repeat: int) -> dict[str, float]:
    from playwright.sync_api import sync_playwright
    from test_browser import drag_slider

    from app_harness import CHROMIUM, CHROMIUM_ARGS, metric_value, settle, streamlit_server

    log = Path(tempfile.gettempdir()) / "awq_measure_streamlit.log"
    runs = []
    with streamlit_server(cache, log) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 1100})
        page.goto(url, timeout=120_000)
        settle(page)
        for i in range(repeat + 1):
            before = metric_value(page, "AWQ rel. error")
            drag_slider(page, "alpha", 0.1 + 0.8 * ((i * 0.37) % 1.0))
            t0 = time.perf_counter()
            page.wait_for_function(
                """([old]) => { for (const m of document.querySelectorAll('[data-testid="stMetric"]')) {
                       const l = m.querySelector('[data-testid="stMetricLabel"]');
                       if (l && l.innerText.trim() === 'AWQ rel. error')
                           return m.querySelector('[data-testid="stMetricValue"]').innerText.trim() !== old; }
                     return false; }""", arg=[before], timeout=60_000)
            if i:  # the first release also loads the layer's weights
                runs.append((time.perf_counter() - t0) * 1000)
            settle(page, quiet=0.5)
        browser.close()
    return {"median": statistics.median(runs), "min": min(runs), "max": max(runs)}


if __name__ == "__main__":
    raise SystemExit(main())
