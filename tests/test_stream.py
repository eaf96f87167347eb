"""The streamed engine (core/model/stream.py, issue 23): a model whose blocks are read from the checkpoint when they
run gives the in-memory model's outputs bit for bit, with one block's weights resident at a time; on the same saved
folder of every supported architecture it gives the in-memory engine's statistics, AWQ scales, model-level metrics,
Fisher sensitivities and exported files; a damaged checkpoint is refused in one sentence, the cache untouched."""
from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import struct
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import pandas as pd
import pytest
import torch
from pandas.testing import assert_frame_equal

from conftest import build_tiny, tiny_settings
from core.analysis import Analysis, analyze
from core.model import stream as stream_mod
from core.model.linears import ModelLoadError
from core.model.models import load_model
from core.model.stream import StreamError, WeightStore, streamed
from core.model.stream import state_dict as stream_state
from core.studies.sweep import SweepSettings

KINDS = ("llama", "qwen2", "gpt2", "opt", "bert")


def _outputs(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("kind", KINDS)
def test_streamed_forward_is_bit_identical_and_holds_one_block(kind, tiny_dir):
    from transformers import AutoModel, AutoModelForCausalLM

    folder = tiny_dir(kind)
    cls = AutoModel if kind == "bert" else AutoModelForCausalLM
    ref_model = cls.from_pretrained(folder, dtype=torch.float32).eval()
    model, s = streamed(folder)
    ids = torch.randint(0, 100, (2, 17))
    ref, got = _outputs(ref_model, ids), _outputs(model, ids)
    assert torch.equal(ref, got)
    assert s.peak_resident_blocks == 1 and s.resident_blocks == 0
    assert all(p.is_meta for p in s.blocks.parameters())  # released after the pass
    # an override replaces the checkpoint's tensor when its block runs
    name = next(n for n, _ in ref_model.named_parameters() if n.startswith(s.prefix + ".0.") and n.endswith("weight")
                and _.dim() == 2)
    s.write(name, torch.zeros_like(dict(ref_model.named_parameters())[name]))
    with torch.no_grad():
        dict(ref_model.named_parameters())[name].zero_()
    assert torch.equal(_outputs(ref_model, ids), _outputs(model, ids))


def test_damaged_checkpoint_is_one_sentence(tiny_dir, tmp_path):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(tiny_dir("llama"), folder)
    f = next(folder.glob("*.safetensors"))
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])  # cut mid-way through the tensors: the header promises more
    with pytest.raises(StreamError) as e:
        streamed(folder)
    assert "safetensors" in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------
# the streamed engine against the in-memory one (issue 23): same statistics, scales, model-level metrics,
# Fisher sensitivities and exported files, on the same saved folder of every supported architecture
# ------------------------------------------------------------------------------------------------
GS = 32  # divides the tiny models' widths (64, 128)
QUALITY_MODES = ["fp", "rtn", "awq", "awq-grouped", "awq-clip", "gptq", "hqq"]
FORMAT = "Q4_0"  # a llama.cpp type, run on the causal LMs with llama-like blocks
FISHER_KINDS = ("llama", "gpt2", "bert")  # llama-like, Conv1D (gpt2) and an encoder (its own objective)
SWEEP = SweepSettings(bits=(3, 4), group_size=GS, n_grid=5)  # n_grid: also the alphas of Model quality's searches


@dataclass
class Engines:
    """One tiny folder analysed twice: streamed and in memory (each in its own cache), with the model's state at
    load time."""

    kind: str
    folder: str
    stream: Analysis
    memory: Analysis
    before: dict[str, dict[str, torch.Tensor]]

    def __iter__(self):
        return iter((self.stream, self.memory))


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in stream_state(model).items()}


@pytest.fixture(scope="module")
def engines(tiny_dir, tokenizer_dir, tmp_path_factory):
    made: dict[str, Engines] = {}

    def get(kind: str) -> Engines:
        if kind not in made:
            folder = tiny_dir(kind)
            settings = tiny_settings(folder, tokenizer_dir, sweep=SWEEP)
            # both loaded explicitly, so $AWQ_EXPLORER_ENGINE does not decide which engine runs
            lm_s = load_model(folder, tokenizer_source=tokenizer_dir, stream=True)
            lm_m = load_model(folder, tokenizer_source=tokenizer_dir, stream=False)
            assert lm_s.streamer is not None and lm_m.streamer is None
            before = {"stream": _state(lm_s.model), "memory": _state(lm_m.model)}
            a_s = analyze(settings, tmp_path_factory.mktemp(f"cache-stream-{kind}"), lm=lm_s)
            a_m = analyze(settings, tmp_path_factory.mktemp(f"cache-memory-{kind}"), lm=lm_m)
            assert a_s.path != a_m.path
            made[kind] = Engines(kind, folder, a_s, a_m, before)
        return made[kind]
    return get


def assert_untouched(e: Engines) -> None:
    """Both models hold exactly what they held when loaded (and the same values); the streamed one has nothing
    left on top of its checkpoint, no block resident, and never had more than one block resident at once."""
    for name, a in (("stream", e.stream), ("memory", e.memory)):
        after = stream_state(a.lm.model)
        before = e.before[name]
        assert after.keys() == before.keys(), name
        for k, v in before.items():
            assert after[k].dtype == v.dtype and torch.equal(after[k], v), f"{name}: {k} changed"
    for k, v in e.before["stream"].items():
        assert torch.equal(v, e.before["memory"][k]), f"the engines load {k} differently"
    s = e.stream.lm.streamer
    assert s.layers == []  # every pass restores the snapshot it took on the bare checkpoint
    assert s.resident_blocks == 0 and s.peak_resident_blocks == 1
    assert all(p.is_meta for p in s.blocks.parameters())


def assert_same_tensors(x: dict, y: dict, what: str) -> None:
    assert x.keys() == y.keys(), what
    for k in x:
        assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), f"{what}: {k}"


def _frame(df: pd.DataFrame | None) -> pd.DataFrame | None:
    """A quality table without its wall-clock column (the only thing allowed to differ between engines)."""
    return None if df is None else df.drop(columns=[c for c in ("seconds",) if c in df.columns])


def test_engine_choice(tiny_dir, tokenizer_dir, monkeypatch):
    """Streamed unless told otherwise: ``stream=`` first, then ``$AWQ_EXPLORER_ENGINE``."""
    folder = tiny_dir("llama")
    monkeypatch.delenv("AWQ_EXPLORER_ENGINE", raising=False)
    assert load_model(folder, tokenizer_source=tokenizer_dir).streamer is not None
    monkeypatch.setenv("AWQ_EXPLORER_ENGINE", "memory")
    assert load_model(folder, tokenizer_source=tokenizer_dir).streamer is None
    assert load_model(folder, tokenizer_source=tokenizer_dir, stream=True).streamer is not None


# ------------------------------------------------------------------------------------------------
# statistics
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_statistics_identical(kind, engines):
    e = engines(kind)
    a_s, a_m = e
    assert set(a_s.tables) == set(a_m.tables) >= {"linears", "channels", "layers", "curves", "importance"}
    for t in a_s.tables:  # per-linear channel stats, the sweep's layers / curves, importance: bit for bit
        assert_frame_equal(a_s.tables[t], a_m.tables[t], check_exact=True, obj=f"{kind} table {t}")
    assert len(a_s.channels) and len(a_s.layers)
    strip = {"created", "created_ns"}  # when each entry was written
    assert {k: v for k, v in a_s.manifest.items() if k not in strip} == \
        {k: v for k, v in a_m.manifest.items() if k not in strip}
    assert_same_tensors(a_s.samples(), a_m.samples(), f"{kind} kept input samples")
    for n in a_s.names:
        h_s, h_m = a_s.hessian(n), a_m.hessian(n)
        assert h_s is not None and h_m is not None and torch.equal(h_s, h_m), f"{kind} Hessian of {n}"
        assert torch.equal(a_s.weight(n), a_m.weight(n)), f"{kind} weight of {n}"
    assert_untouched(e)


# ------------------------------------------------------------------------------------------------
# AWQ scales: the grouped search's recipe, per-group alphas and clips
# ------------------------------------------------------------------------------------------------
def _assert_same_recipe(r_s, r_m, what: str) -> None:
    for f in fields(r_s):
        x, y = getattr(r_s, f.name), getattr(r_m, f.name)
        if isinstance(x, dict):
            assert x.keys() == y.keys(), f"{what}.{f.name}"
            for k in x:
                xs = x[k] if isinstance(x[k], (tuple, list)) else (x[k],)
                ys = y[k] if isinstance(y[k], (tuple, list)) else (y[k],)
                assert len(xs) == len(ys) and all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
                                                  for a, b in zip(xs, ys)), f"{what}.{f.name}[{k}]"
        else:
            assert x == y, f"{what}.{f.name}"


@pytest.mark.parametrize("kind", KINDS)
def test_grouped_awq_scales_identical(kind, engines):
    from core.methods import grouped
    from core.model import blocks
    from core.studies import evaluate

    e = engines(kind)
    res = []
    for a in e:
        lm = a.lm
        input_of = dict(zip(a.linears["name"], a.linears["input_key"]))
        gr = grouped.build_grouping(lm, input_of)
        snap = blocks.snapshot(lm)
        data = evaluate.eval_data(a, lm)
        res.append(grouped.search_grouped(lm, gr, data.calib[:2], snap, bits=[3], group_size=GS, n_grid=SWEEP.n_grid,
                                          clip=True, input_of=input_of, batch_tokens=a.settings.batch_tokens))
        blocks.restore(lm, snap)
    g_s, g_m = res
    assert g_s.grouping == g_m.grouping and len(g_s.searches[3]) == len(g_m.grouping.groups) > 0
    for x, y in zip(g_s.searches[3], g_m.searches[3]):
        assert x.group == y.group and x.best_index == y.best_index, (kind, x.group)
        assert torch.equal(x.alphas, y.alphas) and torch.equal(x.losses, y.losses), (kind, x.group)
        assert torch.equal(x.scales, y.scales), (kind, x.group)
    _assert_same_recipe(g_s.plans[3], g_m.plans[3], f"{kind} recipe")
    assert g_s.plans[3].col  # the recipe really holds scales
    assert_same_tensors(g_s.clips[3], g_m.clips[3], f"{kind} clips")
    assert g_s.clips[3]
    assert_untouched(e)


# ------------------------------------------------------------------------------------------------
# model-level metrics
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_model_quality_identical(kind, engines):
    from core.studies import evaluate

    e = engines(kind)
    # all positions scored: enough tokens for the KL percentiles (llama.cpp's protocol leaves them NaN below 100);
    # the searches on one calibration block: enough to compare, and fast
    run = dict(group_size=GS, protocol="all-positions", search_tokens=64, const_alpha_tokens=64)
    dfs = [_frame(evaluate.run_quality(a, modes=QUALITY_MODES, bits=[3], **run)) for a in e]
    assert_frame_equal(dfs[0], dfs[1], check_exact=True, obj=f"{kind} quality")
    df = dfs[0]
    assert set(df["mode"]) == set(QUALITY_MODES)
    metrics = evaluate.ENCODER_METRICS if kind == "bert" else evaluate.CAUSAL_METRICS
    assert set(df["metric"]) <= set(metrics) and len(set(df["metric"])) > 1
    assert df["value"].notna().all()
    if kind in ("llama", "qwen2"):  # a llama.cpp type: its own quantizers, the same on both engines
        # llama: the grouped scale search on the type too (the clip search on a type is left out: slow, and the clip
        # search itself is compared on the integer grid above)
        modes = ["fp", "rtn", "awq-grouped"] if kind == "llama" else ["fp", "rtn"]
        assert set(modes) <= set(evaluate.FORMAT_MODES)
        f = [_frame(evaluate.run_quality(a, modes=modes, bits=[4], format=FORMAT, **run)) for a in e]
        assert_frame_equal(f[0], f[1], check_exact=True, obj=f"{kind} quality {FORMAT}")
        assert set(f[0]["format"]) == {FORMAT} and set(f[0]["mode"]) == set(modes)
    # what the run cached beside each analysis: the table, the search curves (per-group alphas), the KL quantiles
    for t in ("quality", "quality_search", "quality_kl"):
        x, y = (_frame(a.read_extra(t)) for a in e)
        assert (x is None) == (y is None), t
        if x is not None:
            assert_frame_equal(x, y, check_exact=True, obj=f"{kind} cached {t}")
    assert e.stream.read_extra("quality_search") is not None
    assert_untouched(e)


# ------------------------------------------------------------------------------------------------
# the planner's Fisher pass (gradients: blocks under torch.utils.checkpoint when streamed)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", FISHER_KINDS)
def test_fisher_sensitivity_identical(kind, engines, monkeypatch):
    import torch.utils.checkpoint as tuc

    from core.studies import plan as P

    e = engines(kind)
    calls = []
    real = tuc.checkpoint

    def counted(*args, **kw):
        calls.append(1)
        return real(*args, **kw)
    monkeypatch.setattr(tuc, "checkpoint", counted)
    s = P.PlanSettings(method="rtn", bits=(3,), group_sizes=(GS,), fisher_samples=2, family_calibration=False,
                       test_tokens=256)
    fishers, tables, n_checkpointed = [], [], []
    for a in e:
        sets = P.token_sets(a, s)
        calls.clear()
        fishers.append(P.output_fisher(a.lm, sets.selection, samples=s.fisher_samples,
                                       batch_tokens=a.settings.batch_tokens, seed=s.seed))
        n_checkpointed.append(len(calls))
        if kind != "bert":
            tables.append(P.sensitivity(a, s, sets))
    # streamed: each block's forward ran under torch.utils.checkpoint (weights read again for the backward pass)
    assert n_checkpointed[0] >= len(e.stream.lm.streamer.blocks) and n_checkpointed[1] == 0
    f_s, f_m = fishers
    assert f_s.scale == f_m.scale and f_s.n_tokens == f_m.n_tokens and len(f_s.batches) == len(f_m.batches) > 0
    for i, ((x_s, g_s), (x_m, g_m)) in enumerate(zip(f_s.batches, f_m.batches)):
        assert_same_tensors(x_s, x_m, f"{kind} Fisher inputs, batch {i}")
        assert_same_tensors(g_s, g_m, f"{kind} Fisher gradients, batch {i}")
        assert set(g_s) == set(e.stream.names) and all(float(v.sum()) > 0 for v in g_s.values())
    if tables:
        assert_frame_equal(tables[0], tables[1], check_exact=True, obj=f"{kind} sensitivity")
        assert (tables[0]["fisher"] > 0).all()
    assert_untouched(e)


def _same(x, y) -> bool:
    """Equal, NaN equal to NaN (a uniform plan's objective), through dicts, lists and tuples."""
    if isinstance(x, float) and isinstance(y, float):
        return x == y or (math.isnan(x) and math.isnan(y))
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(_same(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
        return len(x) == len(y) and all(_same(a, b) for a, b in zip(x, y))
    return x == y


def test_plan_identical(engines):
    """A whole plan (sensitivity, family calibration, solver, candidates scored on the selection tokens, figures on
    the test tokens): the same plan, the same figures."""
    from core.studies import plan as P

    e = engines("llama")
    s = P.PlanSettings(budget=3.75, method="awq", test_tokens=256)
    r_s, r_m = (P.run(a, s) for a in e)
    for t in ("sensitivity", "families", "candidates", "quality"):
        assert_frame_equal(_frame(getattr(r_s, t)), _frame(getattr(r_m, t)), check_exact=True, obj=f"plan {t}")
    for a, b in [(r_s.plan, r_m.plan), (r_s.baseline, r_m.baseline), *zip(r_s.plans.values(), r_m.plans.values())]:
        assert _same(asdict(a), asdict(b)), (a, b)
    assert set(r_s.plans) == {3.75} and r_s.notes == r_m.notes and r_s.tokens == r_m.tokens
    assert_untouched(e)


def test_anatomy_identical(tokenizer_dir, tmp_path):
    """Outlier anatomy on test_anatomy's tiny Llama with an implanted super weight: massive activations (hooks on the
    blocks), the super-weight search (zero and repeat: writes into a block's weight), interventions, each method's
    treatment; then Model quality keeping the super weight in fp16. The same tables on both engines."""
    from test_anatomy import implanted_llama

    from core.studies import anatomy, evaluate

    model, _ = implanted_llama(tokenizer_dir)
    folder = tmp_path / "implanted"
    model.save_pretrained(folder)
    del model
    settings = tiny_settings(str(folder), tokenizer_dir, sweep=SWEEP)
    out = []
    for tag in ("stream", "memory"):
        lm = load_model(str(folder), tokenizer_source=tokenizer_dir, stream=tag == "stream")
        a = analyze(settings, tmp_path / tag, lm=lm)
        before = _state(lm.model)
        an = anatomy.run_anatomy(a)
        q = evaluate.run_quality(a, modes=["fp", "rtn", "awq-clip"], bits=[3], group_size=GS, keep=an.keep,
                                 protocol="all-positions", search_tokens=64)
        assert_same_tensors(stream_state(lm.model), before, f"{tag} weights after")
        out.append((an, _frame(q)))
    (x, q_s), (y, q_m) = out
    assert len(x.tables["super"]) == 1  # the implanted super weight was found (on both, by the equality below)
    assert x.tables.keys() == y.tables.keys()
    for t in x.tables:
        assert_frame_equal(x.tables[t], y.tables[t], check_exact=True, obj=f"anatomy {t}")
    strip = {"run_id", "seconds"}
    assert {k: v for k, v in x.meta.items() if k not in strip} == {k: v for k, v in y.meta.items() if k not in strip}
    assert_frame_equal(q_s, q_m, check_exact=True, obj="quality keeping the super weight")
    assert {"rtn+keep", "awq-clip+keep"} <= set(q_s["mode"])


# ------------------------------------------------------------------------------------------------
# the paths a tiny model does not take by default, and half precision
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama"])  # tied embedding and head
def test_streamed_at_its_limits_identical(kind, engines, tokenizer_dir, tmp_path, monkeypatch):
    """A sharded checkpoint, the embedding read by rows and the head in vocabulary chunks (what a large vocabulary
    gets), every replacement tensor and the full-precision reference spilled to a scratch file: the in-memory
    engine's numbers all the same (the Fisher pass's backward within rounding, see below)."""
    from core.model import score
    from core.studies import evaluate
    from core.studies import plan as P

    ref = engines(kind).memory
    folder = tmp_path / "sharded"
    build_tiny(kind).save_pretrained(folder, max_shard_size="1MB")  # tiny_dir(kind)'s weights (same seed)
    assert len(list(folder.glob("*.safetensors"))) > 1
    monkeypatch.setattr(stream_mod, "CHUNKED_BYTES", 0)
    monkeypatch.setattr(stream_mod, "HEAD_CHUNK_ROWS", 8192)  # 4 chunks of the 30522-row head
    monkeypatch.setattr(stream_mod, "SPILL_BYTES", 0)
    spills = []
    init = stream_mod.Spill.__init__

    def recorded(self, *args, **kw):
        init(self, *args, **kw)
        spills.append(self)
    monkeypatch.setattr(stream_mod.Spill, "__init__", recorded)
    lm = load_model(str(folder), tokenizer_source=tokenizer_dir, stream=True)
    assert lm.model.get_input_embeddings().weight.is_meta and lm.model.get_output_embeddings().weight.is_meta
    a = analyze(tiny_settings(str(folder), tokenizer_dir, sweep=SWEEP), tmp_path / "cache", lm=lm)
    for t in ref.tables:
        assert_frame_equal(a.tables[t], ref.tables[t], check_exact=True, obj=f"{kind} table {t}")
    assert_same_tensors(a.samples(), ref.samples(), f"{kind} kept input samples")
    for n in a.names:
        assert torch.equal(a.hessian(n), ref.hessian(n)), n

    run = dict(modes=["fp", "rtn", "awq-clip", "gptq"], bits=[3], group_size=GS, protocol="all-positions",
               search_tokens=64, const_alpha_tokens=64)
    with monkeypatch.context() as m:
        # the streamed engine's fp reference in a scratch file. Only for it: the in-memory engine would score the
        # held-out set in chunks of this budget, in other batches, and its figures would differ from one pass's
        # in the last digits (float64 sums over other groupings; the streamed engine always scores one chunk)
        m.setattr(score, "KL_BUDGET_BYTES", 1)
        q_s = _frame(evaluate.run_quality(a, **run))
    q_m = _frame(evaluate.run_quality(ref, **run))
    assert_frame_equal(q_s, q_m, check_exact=True, obj=f"{kind} quality")
    assert any(sp.spilled for sp in spills)  # the scratch-file path really ran

    sel = P.token_sets(a, P.PlanSettings(test_tokens=256)).selection
    f_s, f_m = (P.output_fisher(x.lm, sel, samples=2, batch_tokens=x.settings.batch_tokens) for x in (a, ref))
    assert f_s.scale == f_m.scale and f_s.n_tokens == f_m.n_tokens
    for (x_s, g_s), (x_m, g_m) in zip(f_s.batches, f_m.batches):
        assert_same_tensors(x_s, x_m, f"{kind} Fisher inputs")  # the forward pass is bit for bit the same
        # The backward pass is not: the head's input gradient is a sum over the vocabulary, taken per chunk of
        # HEAD_CHUNK_ROWS rows and then added up, in another float32 order than one product over the whole
        # vocabulary (with the head in one chunk the Fisher is bit-identical). Rounding-level relative to each
        # linear's largest value (measured ~2e-6); elementwise the relative difference is large only where values
        # cancel to near zero.
        assert g_s.keys() == g_m.keys()
        for k in g_s:
            torch.testing.assert_close(g_s[k], g_m[k], rtol=1e-4, atol=1e-5 * float(g_m[k].abs().max()))
    s = lm.streamer
    assert s.layers == [] and s.resident_blocks == 0 and s.peak_resident_blocks == 1
    assert_same_tensors(stream_state(lm.model), stream_state(ref.lm.model), f"{kind} state after")


@pytest.mark.parametrize("kind,dtype", [("llama", "bfloat16")])
def test_half_precision_identical(kind, dtype, tiny_dir, tokenizer_dir, tmp_path):
    """The checkpoint's float32 tensors cast to the engine's dtype as transformers casts them when loading."""
    from core.studies import evaluate

    folder = tiny_dir(kind)
    settings = tiny_settings(folder, tokenizer_dir, sweep=SWEEP, dtype=dtype)
    a_s, a_m = (analyze(settings, tmp_path / tag, lm=load_model(folder, tokenizer_source=tokenizer_dir, dtype=dtype,
                                                                stream=tag == "stream"))
                for tag in ("stream", "memory"))
    assert a_s.lm.streamer is not None and a_m.lm.streamer is None
    st_s, st_m = stream_state(a_s.lm.model), stream_state(a_m.lm.model)
    assert_same_tensors(st_s, st_m, f"{kind} {dtype} weights")
    assert {v.dtype for k, v in st_s.items() if v.is_floating_point()} == {getattr(torch, dtype)}
    for t in a_s.tables:
        assert_frame_equal(a_s.tables[t], a_m.tables[t], check_exact=True, obj=f"{kind} {dtype} table {t}")
    assert_same_tensors(a_s.samples(), a_m.samples(), f"{kind} {dtype} samples")
    run = dict(modes=["fp", "rtn", "gptq"], bits=[3], group_size=GS, protocol="all-positions")
    q_s, q_m = (_frame(evaluate.run_quality(a, **run)) for a in (a_s, a_m))
    assert_frame_equal(q_s, q_m, check_exact=True, obj=f"{kind} {dtype} quality")
    assert a_s.lm.streamer.peak_resident_blocks == 1
    assert_same_tensors(stream_state(a_s.lm.model), st_m, f"{kind} {dtype} weights after")


# ------------------------------------------------------------------------------------------------
# an exporter: the rtn / awq-clip export models and the compressed-tensors checkpoints they write
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["rtn", "awq-clip"])
def test_export_identical(method, engines, tmp_path):
    from core.grids.spec import QuantSpec
    from core.studies import export as ex

    e = engines("llama")
    spec = QuantSpec(4, GS, True)
    m_s, m_m = (ex.prepare_export(a, method=method, spec=spec) for a in e)
    assert_same_tensors(m_s.state, m_m.state, f"{method} export state")
    assert m_s.folded == m_m.folded and bool(m_s.folded) == (method == "awq-clip")  # norms folded by AWQ
    assert m_s.linears.keys() == m_m.linears.keys() == set(e.stream.names)
    for n, x in m_s.linears.items():
        y = m_m.linears[n]
        assert x.spec == y.spec and torch.equal(x.weight, y.weight) and torch.equal(x.fake, y.fake), n
        assert (x.params is None) == (y.params is None), n
        if x.params is not None:
            assert all(torch.equal(p, q) for p, q in zip(x.params, y.params)), n
    assert_untouched(e)
    pytest.importorskip("compressed_tensors")
    from core.studies import ct_export as ct

    outs = []
    for tag, m in (("stream", m_s), ("memory", m_m)):
        out = tmp_path / tag
        out.mkdir()
        ct.write_compressed_tensors(m, out)
        outs.append(out)
    files = [sorted(p.name for p in o.iterdir()) for o in outs]
    assert files[0] == files[1] and ct.WEIGHTS_FILE in files[0] and "config.json" in files[0]
    for name in files[0]:  # the same bytes: weights, config (from the streamed skeleton's config), tokenizer
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    assert_untouched(e)


# ------------------------------------------------------------------------------------------------
# a damaged checkpoint: refused in one sentence, the cache untouched
# ------------------------------------------------------------------------------------------------
def _tree(root: Path) -> dict[str, str]:
    """Every file and folder under ``root``: relative path -> sha256 of its bytes (``dir`` for a folder)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _header(f: Path) -> tuple[int, dict]:
    data = f.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return n, json.loads(data[8:8 + n])


def _nan_at(f: Path, inside: str | None) -> None:
    """A float32 NaN in the middle of tensor ``inside`` (None: of the tensor covering the middle of the file)."""
    n, hdr = _header(f)
    data = bytearray(f.read_bytes())
    base = 8 + n
    if inside is None:
        mid = len(data) // 2
        inside = next(k for k, v in hdr.items() if k != "__metadata__"
                      and base + v["data_offsets"][0] <= mid < base + v["data_offsets"][1])
    a, b = hdr[inside]["data_offsets"]
    assert hdr[inside]["dtype"] == "F32"
    off = base + a + ((b - a) // 2) // 4 * 4
    data[off:off + 4] = struct.pack("<f", float("nan"))
    f.write_bytes(bytes(data))


def _damage(folder: Path, how: str) -> None:
    files = sorted(folder.glob("*.safetensors"))
    f = files[-1]
    data = f.read_bytes()
    if how in ("cut", "shard-cut"):  # cut mid-way through the tensors (the last shard of a sharded folder)
        f.write_bytes(data[: len(data) // 2])
    elif how == "cut-tail":  # only the last few bytes missing
        f.write_bytes(data[:-4])
    elif how == "nan-mid-file":  # the middle of the file's bytes (inside the embedding of a tiny model)
        _nan_at(f, None)
    elif how == "nan-block":  # inside a block's weight: read only when that block runs
        _, hdr = _header(f)
        _nan_at(f, next(k for k in hdr if k.endswith("layers.1.mlp.down_proj.weight")))
    elif how == "header":  # bytes of the JSON header garbled
        n = int.from_bytes(data[:8], "little")
        f.write_bytes(data[: 8 + n // 2] + b"\x00\xff\x00\xff" + data[8 + n // 2 + 4:])
    else:
        raise ValueError(how)


def _one_sentence(msg: str) -> bool:
    return bool(msg.strip()) and "\n" not in msg and "Traceback" not in msg and not re.search(r"[.!?]\s+[A-Z]", msg)


@pytest.mark.parametrize("engine", ["stream", "memory"])
@pytest.mark.parametrize("how", ["cut", "cut-tail", "nan-mid-file", "nan-block", "header", "shard-cut"])
def test_damaged_checkpoint_refused_and_cache_untouched(how, engine, engines, tokenizer_dir, tmp_path, monkeypatch):
    folder = tmp_path / "damaged"
    if how == "shard-cut":
        build_tiny("llama").save_pretrained(folder, max_shard_size="1MB")
        assert len(list(folder.glob("*.safetensors"))) > 1 and (folder / "model.safetensors.index.json").exists()
        if engine == "stream":  # intact, the sharded folder streams (so what is refused below is the damage)
            lm = load_model(str(folder), tokenizer_source=tokenizer_dir, stream=True)
            assert lm.streamer is not None
            del lm
    else:
        shutil.copytree(engines("llama").folder, folder)
    _damage(folder, how)
    cache = tmp_path / "cache"  # a cache already holding another model's analysis
    shutil.copytree(engines("gpt2").stream.cache_dir, cache)
    before = _tree(cache)
    assert any(p.endswith(".json") for p in before) and len(before) > 3
    monkeypatch.setenv("AWQ_EXPLORER_ENGINE", engine)
    with pytest.raises(ModelLoadError) as err:
        analyze(tiny_settings(str(folder), tokenizer_dir), cache)
    msg = str(err.value)
    assert _one_sentence(msg), msg
    assert _tree(cache) == before


def test_spill_scratch_file_is_unlinked_and_round_trips(tmp_path, monkeypatch):
    """A Spill past its budget writes to a scratch file that is unlinked as soon as it exists (a killed run leaves
    nothing behind in $AWQ_EXPLORER_SPILL_DIR); what it holds reads back bit for bit, empty tensors included,
    replaced and deleted names too."""
    monkeypatch.setenv("AWQ_EXPLORER_SPILL_DIR", str(tmp_path))
    g = torch.Generator().manual_seed(0)
    vals = {f"t{i}": torch.randn(64, 33 + i, generator=g) for i in range(6)}
    vals["bf"] = torch.randn(7, 5, generator=g).bfloat16()
    vals["empty"] = torch.zeros(0, 4)
    sp = stream_mod.Spill(budget_bytes=64 * 40 * 4)
    for k, v in vals.items():
        sp[k] = v
    assert sp.spilled >= 5 and list(tmp_path.iterdir()) == []
    sp["t3"] = vals["t3"] * 2
    del sp["t4"]
    vals["t3"] = vals["t3"] * 2
    del vals["t4"]
    assert set(sp) == set(vals)
    for k, v in vals.items():
        assert sp[k].dtype == v.dtype and torch.equal(sp[k], v), k


def test_gptq_grid_params_wait_in_the_scratch_file(tmp_path, monkeypatch):
    """GridWeights.params (a grid's scale and zero per linear, 1/64 of the float32 weights at group 128) is a Spill
    too: past the budget nothing of it stays in memory, and it reads back bit for bit with its spec."""
    from core.grids.spec import QuantSpec
    from core.methods.base import GridWeights

    monkeypatch.setenv("AWQ_EXPLORER_SPILL_DIR", str(tmp_path))
    monkeypatch.setattr(stream_mod, "SPILL_BYTES", 0)
    g = torch.Generator().manual_seed(1)
    vals = {f"l{i}": (torch.randn(8, 3, generator=g), torch.randint(0, 15, (8, 3), generator=g).float(),
                      QuantSpec(4, 32 + i)) for i in range(4)}
    gw = GridWeights({"l0": torch.randn(8, 96, generator=g)}, params=vals)
    gw.params["l9"] = vals["l9"] = (torch.ones(2, 1), torch.zeros(2, 1), QuantSpec(3, 0))
    del gw.params["l1"], vals["l1"]
    assert gw.params._tensors.spilled == 2 * len(vals) and not gw.params._tensors._mem
    assert list(gw.params) == list(vals) and "l1" not in gw.params and gw.params.get("l1") is None
    for k, (scale, zero, spec) in vals.items():
        got = gw.params[k]
        assert torch.equal(got[0], scale) and torch.equal(got[1], zero) and got[2] == spec, k
