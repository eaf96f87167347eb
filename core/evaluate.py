"""Model quality: does a layer-level AWQ gain survive into the whole model?

``run_quality(analysis, modes=..., bits=..., group_size=...)`` fake-quantizes every linear inside the
transformer blocks in each mode, measures the model on the held-out text, and restores the weights bit for
bit afterwards (also on error). Modes (definitions in ``MODE_DEFINITIONS``, shown by the UI):

* ``fp``: the unquantized model, the reference of every other row.
* ``rtn``: ``Q(W)``.
* ``awq``: ``Q(W*s)/s`` with one alpha per linear, the layer-local search of the analysis (its kept
  calibration sample, ``mean|x|`` over all calibration tokens), as the Layer Lab shows it.
* ``awq-grouped``: official AWQ's grouped search (see ``core.grouped``).
* ``awq-clip``: ``awq-grouped`` plus official AWQ's weight-clipping search (q/k skipped).
* ``const-alpha``: ``Q(W*s)/s`` with one alpha for every linear, chosen on the calibration text by the
  model-level loss (mean next-token cross-entropy for causal LMs; hidden-state relative error against
  ``fp`` for encoders) over the same alpha grid.

Held-out text: the held-out blocks of the analysis' calibration split (``core.calibration.prepare`` with the
analysis' settings; ``heldout_samples x seqlen`` tokens, non-overlapping windows). Metrics: causal LMs
``perplexity`` and ``kl``; encoders ``cosine`` and ``hidden_rel_error`` (``DEFINITIONS``).

Result rows: ``mode, bits, group_size, metric, value, n_tokens, seconds, zero_point``. ``fp`` rows carry
``bits = 16`` (``FP_BITS``: "not quantized", whatever the model's dtype) and the run's group size; they are
always included (the reference is computed anyway).
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable

import pandas as pd
import torch

from . import awq
from .calibration import CalibrationData, CalibrationError, load_text, prepare
from .collect import model_lock
from .grouped import (Plan, apply_plan, build_grouping, forward, is_llama_like, restore, search_grouped,
                      snapshot, token_batches, with_clip)
from .models import LoadedModel
from .quant import check_bits, check_model_group_size

Progress = Callable[[float, str], None]

MODES = ("fp", "rtn", "awq", "awq-grouped", "awq-clip", "const-alpha")
FP_BITS = 16
COLUMNS = ["mode", "bits", "group_size", "metric", "value", "n_tokens", "seconds", "zero_point"]
SEARCH_COLUMNS = ["mode", "bits", "group_size", "zero_point", "block", "target", "alpha", "loss", "chosen"]
CAUSAL_METRICS = ("perplexity", "kl")
ENCODER_METRICS = ("cosine", "hidden_rel_error")
EVAL_VERSION = 1
CONST_ALPHA_TOKENS = 2048  # calibration tokens the const-alpha search scores each alpha on
KL_BUDGET_BYTES = 512 * 2**20  # full-precision log-probs kept at once (the held-out set is chunked beyond)
LOGIT_BATCH_ELEMENTS = 32 * 2**20  # logits per forward batch (bounds memory on large vocabularies)

MODE_DEFINITIONS: dict[str, str] = {
    "fp": "the unquantized model (reference)",
    "rtn": "round-to-nearest: every block linear W -> Q(W)",
    "awq": "one alpha per linear, chosen layer-locally on the kept calibration sample (mean|x| over all "
           "calibration tokens); W -> Q(W*s)/s",
    "awq-grouped": "official AWQ: one scale per group of linears sharing an input, chosen by the loss of the "
                   "module that consumes them, on all calibration tokens, block by block",
    "awq-clip": "awq-grouped plus official AWQ's per-group weight clipping search (q/k projections not clipped)",
    "const-alpha": "one alpha for the whole model, chosen by the model's loss on calibration text; W -> Q(W*s)/s",
}
DEFINITIONS: dict[str, str] = {
    "perplexity": "exp(mean next-token cross-entropy) on the held-out blocks (non-overlapping windows; "
                  "n_tokens = scored tokens)",
    "kl": "mean over scored positions of KL(p_fp || p_quantized) of the next-token distributions, in nats",
    "cosine": "mean over held-out windows of the cosine similarity between the mean-pooled last hidden states "
              "(the sentence embedding of all-MiniLM-L6-v2) of the quantized and the fp model",
    "hidden_rel_error": "||H - H_fp||^2 / ||H_fp||^2 over all held-out tokens' last hidden states",
}


# ------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------
def check_modes(modes: list[str] | tuple[str, ...] | str) -> list[str]:
    if isinstance(modes, str):
        modes = [m for m in modes.split(",")]
    out: list[str] = []
    for m in modes:
        m = str(m).strip().lower()
        if not m:
            continue
        if m not in MODES:
            raise ValueError(f"unknown mode {m!r}; pick from {', '.join(MODES)}")
        if m not in out:
            out.append(m)
    if not out:
        raise ValueError(f"give at least one mode ({', '.join(MODES)})")
    return [m for m in MODES if m in out]


def check_bits_list(bits: list[int] | tuple[int, ...], modes: list[str]) -> list[int]:
    out = sorted({check_bits(b) for b in bits})
    if not out and any(m != "fp" for m in modes):
        raise ValueError("give at least one bit-width (2..8)")
    return out


def check_group_size(widths: list[int], group_size: int) -> int:
    """The model-wide group-size rule, shared with analyze and the Layer Lab (``core.quant``)."""
    return check_model_group_size(widths, group_size)


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------
def eval_data(analysis, lm: LoadedModel, text: str | None = None) -> CalibrationData:
    """The analysis' calibration and held-out blocks, recreated from its settings (and checked against
    the text hash recorded in its manifest). ``text``: the calibration text, when it was an upload."""
    spec = analysis.settings.calibration
    if text is None:
        try:
            text = load_text(spec.source)
        except CalibrationError as e:
            raise ValueError(f"cannot reload this analysis' calibration text ({e}); pass it as text=") from e
    data = prepare(spec, lm.tokenizer, lm.max_positions, text=text)
    want = analysis.manifest.get("text_sha")
    if want and data.text_sha != want:
        raise ValueError("the calibration text differs from the one this analysis was computed on "
                         "(the file changed?); re-run the analysis first")
    return data


# ------------------------------------------------------------------------------------------------
# metrics
# ------------------------------------------------------------------------------------------------
def _eval_batches(lm: LoadedModel, ids: torch.Tensor, batch_tokens: int) -> list[torch.Tensor]:
    t = ids.shape[1]
    per = max(1, int(batch_tokens) // t)
    if lm.is_causal:
        vocab = int(getattr(lm.model.config, "vocab_size", 0) or 0) or 50000
        per = max(1, min(per, LOGIT_BATCH_ELEMENTS // (t * vocab)))
    return [ids[i:i + per] for i in range(0, ids.shape[0], per)]


def _chunks(lm: LoadedModel, ids: torch.Tensor) -> list[torch.Tensor]:
    """Held-out blocks in chunks whose full-precision reference fits ``KL_BUDGET_BYTES``."""
    if not lm.is_causal:
        return [ids]
    vocab = int(getattr(lm.model.config, "vocab_size", 0) or 0) or 50000
    per = max(1, KL_BUDGET_BYTES // (ids.shape[1] * vocab * 4))
    return [ids[i:i + per] for i in range(0, ids.shape[0], per)]


def _output(lm: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    out = forward(lm, ids)
    if lm.is_causal:
        return out.logits.float()
    h = getattr(out, "last_hidden_state", None)
    if h is None:
        h = out[0]
    return h.float()


class _Score:
    """Accumulates one mode's metrics against the full-precision reference, batch by batch."""

    def __init__(self, causal: bool):
        self.causal = causal
        self.nll = self.kl = self.err = self.ref = self.cos = 0.0
        self.n_tok = self.n_seq = 0

    def add(self, ids: torch.Tensor, out: torch.Tensor, ref: torch.Tensor | None) -> None:
        if self.causal:
            logp = torch.log_softmax(out[:, :-1], dim=-1)
            tgt = ids[:, 1:].to(logp.device)
            self.nll += float(-logp.gather(-1, tgt.unsqueeze(-1)).sum(dtype=torch.float64))
            if ref is not None:
                self.kl += float((ref.exp() * (ref - logp)).sum(dtype=torch.float64))
            self.n_tok += int(tgt.numel())
        else:
            self.n_tok += int(ids.numel())
            self.n_seq += int(ids.shape[0])
            if ref is not None:
                self.err += float((out - ref).double().pow(2).sum())
                self.ref += float(ref.double().pow(2).sum())
                self.cos += float(torch.nn.functional.cosine_similarity(out.mean(1).double(), ref.mean(1).double(),
                                                                        dim=-1).sum())

    def metrics(self, fp: bool = False) -> dict[str, float]:
        if self.causal:
            ppl = math.exp(self.nll / self.n_tok) if self.n_tok else float("nan")
            return {"perplexity": ppl, "kl": 0.0 if fp else self.kl / max(1, self.n_tok)}
        if fp:
            return {"cosine": 1.0, "hidden_rel_error": 0.0}
        return {"cosine": self.cos / max(1, self.n_seq),
                "hidden_rel_error": self.err / self.ref if self.ref > 0 else float("nan")}


def _reference(lm: LoadedModel, batches: list[torch.Tensor], score: _Score) -> list[torch.Tensor]:
    refs = []
    for b in batches:
        out = _output(lm, b)
        score.add(b, out, None)
        refs.append(torch.log_softmax(out[:, :-1], dim=-1) if lm.is_causal else out)
    return refs


# ------------------------------------------------------------------------------------------------
# plans per mode
# ------------------------------------------------------------------------------------------------
def _per_linear_plan(lm: LoadedModel, bits: int, g: int, zp: bool, scales: dict[str, torch.Tensor]) -> Plan:
    plan = Plan(bits=bits, group_size=g, zero_point=zp)
    for li in lm.linears:
        plan.col[li.name] = scales[li.name].float().cpu()
        plan.unscale.add(li.name)
    return plan


def _awq_plan(analysis, lm: LoadedModel, bits: int, g: int, zp: bool, n_grid: int) -> tuple[Plan, list[dict]]:
    """Per-linear AWQ: each linear's own best alpha from the layer-local search (the analysis' sweep table
    when it was run at this setting, else ``Analysis.alpha_curve``, which computes the same search)."""
    sw = analysis.settings.sweep
    layers = analysis.layers
    sel = layers[layers["bits"] == bits] if "bits" in layers else layers.iloc[0:0]
    width = dict(zip(analysis.linears["name"], analysis.linears["in_features"]))
    cached = (bits in tuple(sw.bits) and bool(sw.zero_point) == zp and int(sw.n_grid) == n_grid
              and len(sel) == len(lm.linears)
              and all(int(gs) == (g if g > 0 else int(width[n])) for n, gs in zip(sel["name"], sel["group_size"])))
    scales: dict[str, torch.Tensor] = {}
    rows: list[dict] = []
    block_of = {li.name: li.block for li in lm.linears}
    if cached:
        curves = analysis.curves
        curves = curves[curves["bits"] == bits]
        for n, alpha in zip(sel["name"], sel["best_alpha"]):
            scales[n] = analysis.scales_at(n, float(alpha), group_size=g)
            c = curves[curves["name"] == n]
            al = torch.tensor(c["alpha"].to_numpy())
            rows += _search_rows("awq", bits, g, zp, block_of[n], n, al, torch.tensor(c["loss"].to_numpy()),
                                 int((al - float(alpha)).abs().argmin()))
    else:
        for li in lm.linears:
            c = analysis.alpha_curve(li.name, bits=bits, group_size=g, zero_point=zp, n_grid=n_grid)
            scales[li.name] = c.scales
            rows += _search_rows("awq", bits, g, zp, li.block, li.name, c.alphas, c.losses, c.best_index)
    return _per_linear_plan(lm, bits, g, zp, scales), rows


def _search_rows(mode: str, bits: int, g: int, zp: bool, block: int, target: str, alphas, losses, best: int) -> list[dict]:
    return [{"mode": mode, "bits": bits, "group_size": g, "zero_point": zp, "block": block, "target": target,
             "alpha": float(a), "loss": float(v), "chosen": i == best}
            for i, (a, v) in enumerate(zip(alphas.tolist(), losses.tolist()))]


class _Ticker:
    def __init__(self, progress: Progress | None, total: float):
        self.progress = progress or (lambda f, m: None)
        self.total = max(total, 1e-9)
        self.done = 0.0

    def sub(self, units: float) -> Progress:
        start = self.done

        def report(f: float, msg: str) -> None:
            self.progress(min(0.999, (start + units * min(1.0, max(0.0, f))) / self.total), msg)
        self.done += units
        return report

    def step(self, units: float, msg: str) -> None:
        self.done += units
        self.progress(min(0.999, self.done / self.total), msg)


# ------------------------------------------------------------------------------------------------
# the public entry point
# ------------------------------------------------------------------------------------------------
def run_quality(analysis, *, modes: list[str], bits: list[int], group_size: int, zero_point: bool = True,
                progress: Progress | None = None, text: str | None = None) -> pd.DataFrame:
    """Fake-quantize the whole model in each of ``modes`` at each of ``bits`` and measure it on held-out text.

    Returns this run's rows (``COLUMNS``) and merges them into the analysis' cached ``quality`` table
    (see :func:`cached_quality`); the search curves go to ``quality_search`` (:func:`cached_search`).
    The model's parameters are bit-identical afterwards, also when this raises.
    """
    modes = check_modes(modes)
    bits = check_bits_list(bits, modes)
    g = check_group_size([int(w) for w in analysis.linears["in_features"]], group_size)
    zp = bool(zero_point)
    report = progress or (lambda f, m: None)
    report(0.0, "loading the model")
    lm = analysis.lm
    data = eval_data(analysis, lm, text)
    settings = analysis.settings
    n_grid = int(settings.sweep.n_grid)
    batch_tokens = int(settings.batch_tokens)
    q_modes = [m for m in modes if m != "fp"]
    tasks = [(m, b) for m in q_modes for b in bits]
    n_blocks = int(analysis.linears["block"].max()) + 1
    chunks = _chunks(lm, data.heldout)
    grouped = [m for m in q_modes if m in ("awq-grouped", "awq-clip")]
    ca_blocks = data.calib[:max(1, min(data.calib.shape[0], CONST_ALPHA_TOKENS // data.seqlen))]
    calib_vs_held = data.calib.numel() / max(1, data.heldout.numel())
    ca_vs_held = ca_blocks.numel() / max(1, data.heldout.numel())
    # progress units: one unit = one forward pass over the held-out blocks
    u_awq = 0.2 * len(bits) if "awq" in q_modes else 0.0
    u_grouped = (calib_vs_held * (n_blocks + 1) / 2 + len(bits)) if grouped else 0.0
    u_const = (n_grid + 1) * ca_vs_held
    ticker = _Ticker(report, u_awq + u_grouped + (len(bits) * u_const if "const-alpha" in q_modes else 0.0)
                     + 1 + len(tasks))
    plans: dict[tuple[str, int], Plan] = {}
    seconds: dict[tuple[str, int], float] = {}
    search_rows: list[dict] = []
    input_of = dict(zip(analysis.linears["name"], analysis.linears["input_key"]))

    with model_lock(lm.model), torch.no_grad():
        snap = snapshot(lm)
        try:
            # 1. plans (the model is unmodified during every search)
            for b in bits:
                if "rtn" in q_modes:
                    plans[("rtn", b)], seconds[("rtn", b)] = Plan(bits=b, group_size=g, zero_point=zp), 0.0
                if "awq" in q_modes:
                    t0 = time.perf_counter()
                    plans[("awq", b)], rows = _awq_plan(analysis, lm, b, g, zp, n_grid)
                    search_rows += rows
                    seconds[("awq", b)] = time.perf_counter() - t0
                    ticker.step(0.2, f"per-linear AWQ scales, w{b}")
            if grouped:
                grouping = build_grouping(lm, input_of)
                res = search_grouped(lm, grouping, data.calib, snap, bits=bits, group_size=g, zero_point=zp,
                                     n_grid=n_grid, clip="awq-clip" in grouped, batch_tokens=batch_tokens,
                                     input_of=input_of, progress=ticker.sub(u_grouped))
                for b in bits:
                    for s in res.searches[b]:
                        search_rows += _search_rows("awq-grouped", b, g, zp, s.group.block,
                                                    s.group.label(grouping.prefix), s.alphas, s.losses, s.best_index)
                    if "awq-grouped" in grouped:
                        plans[("awq-grouped", b)] = res.plans[b]
                        seconds[("awq-grouped", b)] = res.scale_seconds[b]
                    if "awq-clip" in grouped:
                        plans[("awq-clip", b)] = with_clip(res.plans[b], res.clips[b])
                        seconds[("awq-clip", b)] = res.scale_seconds[b] + res.clip_seconds[b]
            if "const-alpha" in q_modes:
                for b in bits:
                    t0 = time.perf_counter()
                    plan, alphas, losses, best = _const_alpha(analysis, lm, snap, ca_blocks, b, g, zp, n_grid,
                                                              batch_tokens, ticker.sub(u_const))
                    plans[("const-alpha", b)] = plan
                    seconds[("const-alpha", b)] = time.perf_counter() - t0
                    search_rows += _search_rows("const-alpha", b, g, zp, -1, "whole model (calibration loss)",
                                                alphas, losses, best)
            # 2. held-out evaluation, chunk by chunk (the fp reference of one chunk is kept in memory)
            fp_score = _Score(lm.is_causal)
            scores = {t: _Score(lm.is_causal) for t in tasks}
            fp_seconds = 0.0
            for chunk in chunks:
                batches = _eval_batches(lm, chunk, batch_tokens)
                t0 = time.perf_counter()
                refs = _reference(lm, batches, fp_score)
                fp_seconds += time.perf_counter() - t0
                ticker.step(1 / len(chunks), "full-precision reference")
                for t in tasks:
                    t0 = time.perf_counter()
                    apply_plan(lm, plans[t], snap)
                    try:
                        for b_ids, ref in zip(batches, refs):
                            scores[t].add(b_ids, _output(lm, b_ids), ref)
                    finally:
                        restore(lm, snap)
                    seconds[t] += time.perf_counter() - t0
                    ticker.step(1 / len(chunks), f"held-out evaluation: {t[0]} w{t[1]}")
                del refs
        finally:
            restore(lm, snap)

    rows = []
    n_tok = fp_score.n_tok
    for metric, v in fp_score.metrics(fp=True).items():
        rows.append({"mode": "fp", "bits": FP_BITS, "group_size": g, "metric": metric, "value": v,
                     "n_tokens": n_tok, "seconds": fp_seconds, "zero_point": zp})
    for t in tasks:
        for metric, v in scores[t].metrics().items():
            rows.append({"mode": t[0], "bits": t[1], "group_size": g, "metric": metric, "value": v,
                         "n_tokens": scores[t].n_tok, "seconds": seconds[t], "zero_point": zp})
    df = _frame(rows)
    _merge_write(analysis, "quality", df, ["mode", "bits", "group_size", "zero_point", "metric"])
    if search_rows:
        _merge_write(analysis, "quality_search", pd.DataFrame(search_rows, columns=SEARCH_COLUMNS),
                     ["mode", "bits", "group_size", "zero_point"])
    report(1.0, "done")
    return df


def _const_alpha(analysis, lm: LoadedModel, snap, ids: torch.Tensor, bits: int, g: int, zp: bool, n_grid: int,
                 batch_tokens: int, progress: Progress) -> tuple[Plan, torch.Tensor, torch.Tensor, int]:
    """One alpha for every linear: the grid point with the lowest model-level loss on ``ids`` (calibration)."""
    alphas = awq.alpha_grid(n_grid)
    by_key: dict[str, torch.Tensor] = {}
    key_of = dict(zip(analysis.linears["name"], analysis.linears["input_key"]))
    for li in lm.linears:
        k = key_of.get(li.name, li.name)
        if k not in by_key:
            by_key[k] = awq.awq_scales(analysis.x_mean(li.name), alphas)  # [A, in], mean|x| of all calib tokens
    batches = _eval_batches(lm, ids, batch_tokens)
    ref = None if lm.is_causal else [_output(lm, b) for b in batches]
    progress(1 / (n_grid + 1), "const-alpha: reference")
    losses = torch.empty(len(alphas), dtype=torch.float64)
    for i in range(len(alphas)):
        plan = _per_linear_plan(lm, bits, g, zp, {li.name: by_key[key_of.get(li.name, li.name)][i] for li in lm.linears})
        apply_plan(lm, plan, snap)
        try:
            s = _Score(lm.is_causal)
            for j, b in enumerate(batches):
                s.add(b, _output(lm, b), None if ref is None else ref[j])
        finally:
            restore(lm, snap)
        losses[i] = s.nll / max(1, s.n_tok) if lm.is_causal else (s.err / s.ref if s.ref > 0 else float("nan"))
        progress((i + 2) / (n_grid + 1), f"const-alpha search w{bits}: alpha {float(alphas[i]):.2f}")
    best = awq.first_min_index(losses)
    plan = _per_linear_plan(lm, bits, g, zp, {li.name: by_key[key_of.get(li.name, li.name)][best] for li in lm.linears})
    return plan, alphas, losses, best


# ------------------------------------------------------------------------------------------------
# cache
# ------------------------------------------------------------------------------------------------
def _frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=COLUMNS)
    order = {m: i for i, m in enumerate(MODES)}
    metric_order = {m: i for i, m in enumerate(CAUSAL_METRICS + ENCODER_METRICS)}
    if df.empty:
        return df
    df = df.astype({"bits": "int64", "group_size": "int64", "n_tokens": "int64", "value": "float64",
                    "seconds": "float64", "zero_point": "bool"})
    key = df["mode"].map(order).fillna(99) * 1e6 + df["bits"] * 1e3 + df["metric"].map(metric_order).fillna(99)
    return df.iloc[key.argsort(kind="stable")].reset_index(drop=True)


def _merge_write(analysis, name: str, new: pd.DataFrame, keys: list[str]) -> None:
    new = new.assign(eval_version=EVAL_VERSION)
    old = analysis.read_extra(name)
    if old is not None and not old.empty and set(new.columns) <= set(old.columns):
        old = old[old.get("eval_version", -1) == EVAL_VERSION] if "eval_version" in old else old.iloc[0:0]
        new_keys = set(map(tuple, new[keys].drop_duplicates().itertuples(index=False, name=None)))
        kept = old[[tuple(r) not in new_keys for r in old[keys].itertuples(index=False, name=None)]]
        new = pd.concat([kept[new.columns], new], ignore_index=True)
    analysis.write_extra(name, new)


def _read(analysis, name: str) -> pd.DataFrame | None:
    df = analysis.read_extra(name)
    if df is None or df.empty or "eval_version" not in df:
        return None
    df = df[df["eval_version"] == EVAL_VERSION].drop(columns=["eval_version"])
    return df.reset_index(drop=True) if not df.empty else None


def cached_quality(analysis) -> pd.DataFrame | None:
    """Every model-quality row computed so far for this analysis (all runs merged), or ``None``."""
    df = _read(analysis, "quality")
    if df is None or not set(COLUMNS) <= set(df.columns):
        return None
    return _frame(df[COLUMNS].to_dict("records"))


def cached_search(analysis) -> pd.DataFrame | None:
    """The search curves behind the cached rows (``SEARCH_COLUMNS``): for ``awq`` one curve per linear, for
    ``awq-grouped`` (shared by ``awq-clip``) one per scale group, for ``const-alpha`` the model-level curve
    (``block = -1``); ``chosen`` marks the selected alpha. ``None`` when nothing is cached."""
    df = _read(analysis, "quality_search")
    if df is None or not set(SEARCH_COLUMNS) <= set(df.columns):
        return None
    return df[SEARCH_COLUMNS]


# ------------------------------------------------------------------------------------------------
# UI text
# ------------------------------------------------------------------------------------------------
def _split_name(name: str, block: int) -> tuple[str, str]:
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p == str(block):
            return ".".join(parts[:i]), ".".join(parts[i + 1:])
    return "", name


def _model_type(analysis) -> str:
    lm = getattr(analysis, "_lm", None)
    if lm is None and analysis.manifest.get("model_type"):  # recorded by analyze (GGUF sources have no config.json)
        return str(analysis.manifest["model_type"])
    if lm is None:
        try:
            from transformers import AutoConfig

            from .models import MINILM, canonical_model, minilm_path
            s = analysis.settings
            src = str(minilm_path()) if canonical_model(s.model) == MINILM else s.model
            cfg = AutoConfig.from_pretrained(src, trust_remote_code=s.trust_remote_code,
                                             **({"revision": s.revision} if s.revision else {}))
            return str(getattr(cfg, "model_type", "") or "")
        except Exception:  # noqa: BLE001 - fall back to the model itself
            lm = analysis.lm
    return str(getattr(lm.model.config, "model_type", "") or "")


def grouping_note(analysis) -> str:
    """One sentence: how ``awq-grouped`` groups this architecture's linears (for the UI)."""
    lin = analysis.linears
    b0 = lin[lin["block"] == lin["block"].min()]
    blk = int(b0["block"].iloc[0])
    rel = {_split_name(n, blk)[1]: r for n, r in zip(b0["name"], b0.to_dict("records"))}
    mtype = _model_type(analysis)
    if is_llama_like(mtype, set(rel)):
        v, o = rel["self_attn.v_proj"], rel["self_attn.o_proj"]
        if (v["out_features"], v["in_features"]) == (o["out_features"], o["in_features"]):
            vo = "v_proj → o_proj scored on o_proj"
        else:
            vo = ("no v_proj → o_proj group (their weight shapes differ: grouped-query attention, which official "
                  "AWQ skips, so o_proj is quantized unscaled)")
        return (f"{mtype} blocks are Llama-style, so awq-grouped uses official AWQ's groups — input_layernorm → "
                f"q/k/v scored on the self-attention output, {vo}, post_attention_layernorm → gate/up scored on "
                f"the MLP output, up_proj → down_proj scored on down_proj — with each scale folded into the "
                f"preceding norm or linear.")
    groups: dict[str, list[str]] = {}
    for n, key in zip(b0["name"], b0["input_key"]):
        groups.setdefault(key, []).append(_split_name(n, blk)[1])
    desc = "; ".join("{" + ", ".join(v) + "}" for v in groups.values())
    return (f"{mtype or 'This model'} is not a Llama-style architecture, so awq-grouped gives one scale to each set "
            f"of linears that read the same input ({desc}), chosen by the MSE of their concatenated outputs on all "
            f"calibration tokens and applied as Q(W·s)/s.")


__all__ = ["MODES", "FP_BITS", "COLUMNS", "SEARCH_COLUMNS", "DEFINITIONS", "MODE_DEFINITIONS", "run_quality",
           "cached_quality", "cached_search", "grouping_note", "eval_data", "check_modes"]

