"""compressed-tensors export (issue 20): the folder reloads in transformers and its logits match the explorer's
fake-quantized model within ``ct_export.MAX_LOGIT_DIFF`` / ``MAX_MEAN_KL``; plans keep every linear at its setting;
bad input gets one sentence and leaves nothing behind."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.model.stream import state_dict as stream_state

pytest.importorskip("compressed_tensors")

from conftest import tiny_settings  # noqa: E402
from core.analysis import AnalysisSettings, analyze  # noqa: E402
from core.grids.spec import QuantSpec  # noqa: E402
from core.model.calibration import CalibrationSpec  # noqa: E402
from core.studies import ct_export as ct  # noqa: E402
from core.studies import export as ex  # noqa: E402
from core.studies.sweep import SweepSettings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LLMC_PYTHON = ROOT / ".llmc-venv" / "bin" / "python"


@pytest.fixture(scope="module")
def tiny(tiny_dir, tokenizer_dir, tmp_path_factory):
    return analyze(tiny_settings(tiny_dir("llama"), tokenizer_dir), tmp_path_factory.mktemp("ct-llama"))


def _plan(analysis) -> dict:
    """Every third linear at 3, 4 bits or kept in full precision, group sizes 32 and 64 alternating."""
    names = list(analysis.linears["name"])
    return {"method": "gptq", "layers": {n: {"bits": (3, 4, 16)[i % 3], "group_size": (32, 64)[i % 2]}
                                         for i, n in enumerate(names)}}


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


@pytest.mark.parametrize("method,zero_point", [("rtn", True), ("awq-clip", True), ("gptq", True), ("gptq", False),
                                               ("awq-gptq", True), ("awq-gptq", False)])
def test_uniform_export_reloads_bit_exact(tiny, tmp_path, method, zero_point):
    spec = QuantSpec(4, 32, zero_point)
    out = tmp_path / "ckpt"
    s = ex.export(tiny, format=ct.FORMAT, out=out, method=method, spec=spec)
    v = s["verify"]
    assert v["ok"] and v["max_logit_diff"] <= ct.MAX_LOGIT_DIFF and v["mean_kl"] <= ct.MAX_MEAN_KL
    assert v["same_top"] == 1.0 and v["tokens"] > 0 and "from_pretrained" in v["loader"]
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized"
    assert cfg["ignore"] == ["lm_head"]
    (group,) = cfg["config_groups"].values()
    assert sorted(group["targets"]) == sorted(tiny.linears["name"])
    assert group["weights"]["symmetric"] is (not zero_point) and group["weights"]["group_size"] == 32
    from safetensors import safe_open

    with safe_open(str(out / ct.WEIGHTS_FILE), "pt") as f:
        keys = set(f.keys())
        n = tiny.linears["name"].iloc[0]
        packed, shape = f.get_tensor(f"{n}.weight_packed"), f.get_tensor(f"{n}.weight_shape")
    assert packed.dtype == torch.int32 and packed.shape[1] == math.ceil(int(shape[1]) * 4 / 32)
    assert (f"{n}.weight_zero_point" in keys) is zero_point and f"{n}.weight" not in keys
    assert (out / "tokenizer_config.json").exists() and (out / "generation_config.json").exists()
    # ordinary permissions (a runtime under another account reads it): not mkdtemp's / safetensors' private 0600
    mask = os.umask(0o022)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask
    assert {f.name: f.stat().st_mode & 0o777 for f in out.iterdir()} == {f.name: 0o666 & ~mask for f in out.iterdir()}
    # the reloaded weights are the explorer's quantized weights themselves
    model = ex.prepare_export(tiny, method=method, spec=spec) if method == "rtn" else None
    if model is not None:
        reloaded, _ = ct.load_checkpoint(out)
        for name, li in model.linears.items():
            assert torch.equal(reloaded.get_submodule(name).weight.detach(), li.fake)


def test_awq_gptq_checkpoint_is_the_model_model_quality_scores(tiny, tmp_path):
    """awq-gptq: AWQ's scales folded into the norms and v_proj / up_proj rows, GPTQ's own codes packed; the reloaded
    checkpoint gives the logits of the variant Model quality scores (the model half's Recipe, applied as
    ``evaluate.apply_variant`` applies it); a mixed plan keeps every linear at its setting."""
    from core.methods import METHODS
    from core.methods.recipe import Recipe
    from core.model.blocks import restore, snapshot
    from core.studies import evaluate

    spec = QuantSpec(4, 32, True)
    out = tmp_path / "awq-gptq"
    s = ex.export(tiny, format=ct.FORMAT, out=out, method="awq-gptq", spec=spec, verify=False)
    lm = tiny.lm
    snap = snapshot(lm)
    ids = torch.arange(48).view(1, -1) % int(lm.model.config.vocab_size)
    try:
        data = evaluate.eval_data(tiny, lm)
        with torch.no_grad():
            recipe = ex.run_method(tiny, lm, data, snap, "awq-gptq", spec, lambda f, m: None)
        assert isinstance(recipe, Recipe) and recipe.norm and recipe.row and not recipe.unscale
        assert set(recipe.rounded) == set(recipe.grids) == set(tiny.linears["name"])
        evaluate.apply_variant(lm, recipe, snap)
        with torch.no_grad():
            ours = lm.model(input_ids=ids).logits.float()
        norm = next(n for n, v in recipe.norm.items() if not torch.equal(v, torch.ones_like(v)))  # alpha > 0
        folded = stream_state(lm.model)[f"{norm}.weight"].detach().clone()
    finally:
        restore(lm, snap)
    reloaded, _ = ct.load_checkpoint(out)
    with torch.no_grad():
        theirs = reloaded(input_ids=ids).logits.float()
    assert torch.equal(reloaded.get_submodule(norm).weight.detach(), folded)
    assert not torch.equal(folded, snap[f"{norm}.weight"].float())  # the scales are folded in
    assert ct.compare_logits(ours, theirs)["max_logit_diff"] <= ct.MAX_LOGIT_DIFF
    assert s["groups"] == {"w4g32 asym": len(tiny.linears)}
    # a mixed plan: one GPTQ pass on the folded model, each linear at its own setting (fp16 ones stored folded)
    plan = _plan(tiny)
    p = ex.export(tiny, format=ct.FORMAT, out=tmp_path / "plan", method="awq-gptq", plan=plan)
    assert p["verify"]["ok"] and p["kept"] == sum(v["bits"] == 16 for v in plan["layers"].values())
    read = ct.read_groups(tmp_path / "plan")
    assert {n: (r["num_bits"], r["group_size"]) for n, r in read.items()} == {
        n: (v["bits"], v["group_size"]) for n, v in plan["layers"].items() if v["bits"] != 16}


def test_asymmetric_codes_follow_compressed_tensors_convention():
    """Ours: q in [0, 2^b - 1], w = (q - z) s; compressed-tensors: signed codes, the same q - z."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    torch.manual_seed(0)
    w = torch.randn(8, 64)
    from core.grids.quant import pseudo_quantize

    fake = pseudo_quantize(w, 3, 32, True)
    li = ex.ExportLinear("x", w, fake, QuantSpec(3, 32, True))
    codes, scale, zero = ct.linear_codes(li)
    assert codes.min() >= -4 and codes.max() <= 3 and zero.min() >= -4 and zero.max() <= 3
    args = QuantizationArgs(num_bits=3, type="int", symmetric=False, strategy="group", group_size=32)
    assert torch.equal(dequantize(codes, scale, zero, args), fake)
    off_grid = ex.ExportLinear("x", w, fake + 1e-3, QuantSpec(3, 32, True))
    with pytest.raises(ex.ExportError, match="does not lie on an integer"):
        ct.linear_codes(off_grid)


def test_mixed_plan_keeps_each_linear_at_its_bits(tiny, tmp_path):
    plan = _plan(tiny)
    out = tmp_path / "plan"
    s = ex.export(tiny, format=ct.FORMAT, out=out, method="gptq", plan=plan)
    assert s["verify"]["ok"] and s["verify"]["max_logit_diff"] <= ct.MAX_LOGIT_DIFF
    read = ct.read_groups(out)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    from safetensors import safe_open

    with safe_open(str(out / ct.WEIGHTS_FILE), "pt") as f:
        for n, v in plan["layers"].items():
            if v["bits"] == 16:
                assert n not in read and n in cfg["ignore"] and f"{n}.weight" in f.keys()
                continue
            assert (read[n]["num_bits"], read[n]["group_size"]) == (v["bits"], v["group_size"])
            shape = f.get_tensor(f"{n}.weight_shape")
            assert f.get_tensor(f"{n}.weight_scale").shape[1] == int(shape[1]) // v["group_size"]
            assert f.get_tensor(f"{n}.weight_packed").shape[1] == math.ceil(int(shape[1]) * v["bits"] / 32)
    assert len(cfg["config_groups"]) == 4  # (3, 4 bits) x (32, 64)


def test_a_mixed_gptq_plan_is_one_sequential_pass(tiny, monkeypatch):
    """GPTQ of a plan runs once, block by block, each linear at its own setting (fp16 ones left as they are, which
    the later blocks see), not once per setting."""
    from core.methods import gptq

    calls = []
    real = gptq.sequential_gptq
    monkeypatch.setattr(gptq, "sequential_gptq", lambda *a, **k: calls.append(k.get("specs")) or real(*a, **k))
    plan = _plan(tiny)
    model = ex.prepare_export(tiny, method="gptq", plan=plan)
    assert len(calls) == 1 and calls[0] is not None
    for n, v in plan["layers"].items():
        li = model.linears[n]
        if v["bits"] == 16:
            assert li.spec is None and torch.equal(li.fake, tiny.weight(n))
            continue
        levels = max(len(set(row.tolist())) for row in li.fake.reshape(-1, v["group_size"]))
        assert li.params is not None and levels <= 2 ** v["bits"], n


def test_bad_input_one_sentence_nothing_left(tiny, tmp_path):
    before = _leftovers(tmp_path)
    cases = [
        dict(method="hqq", spec=QuantSpec(4, 32, True)),  # float zero points
        dict(method="awq", spec=QuantSpec(4, 32, True)),  # Q(W s)/s: no folded form
        dict(method="nope", spec=QuantSpec(4, 32, True)),
        dict(method="gptq", plan={"layers": {"model.nope": {"bits": 4, "group_size": 32}}}),
    ]
    for kw in cases:
        with pytest.raises(ex.ExportError) as e:
            ex.export(tiny, format=ct.FORMAT, out=tmp_path / "x", **kw)
        assert "\n" not in str(e.value) and str(e.value)
        assert _leftovers(tmp_path) == before, kw
        if kw["method"] == "hqq":
            assert str(e.value) == ct.HQQ_REASON
    (tmp_path / "taken").mkdir()
    with pytest.raises(ex.ExportError, match="already exists"):
        ex.export(tiny, format=ct.FORMAT, out=tmp_path / "taken", method="rtn", spec=QuantSpec(4, 32, True))
    assert not any((tmp_path / "taken").iterdir())


@pytest.mark.skipif(not LLMC_PYTHON.exists(), reason="llm-compressor's environment (bench/llmc_env.sh) is missing")
def test_transformers_517_loads_it_through_its_default_path(tiny, tmp_path):
    """transformers 5.17 + compressed-tensors 0.19 (llm-compressor's environment) load a mixed, asymmetric folder
    with a plain from_pretrained; its logits equal the explorer's."""
    out = tmp_path / "plan"
    ex.export(tiny, format=ct.FORMAT, out=out, method="gptq", plan=_plan(tiny), verify=False)
    model = ex.prepare_export(tiny, method="gptq", plan=_plan(tiny))
    ids = torch.arange(40).view(1, -1) % int(tiny.lm.model.config.vocab_size)
    from core.model.blocks import restore, snapshot
    from core.studies import evaluate

    lm = tiny.lm
    snap = snapshot(lm)
    try:
        evaluate.apply_variant(lm, model.fake_weights(), snap)
        with torch.no_grad():
            ours = lm.model(input_ids=ids).logits.float()
    finally:
        restore(lm, snap)
    torch.save(ids, tmp_path / "ids.pt")
    code = ("import sys, torch, transformers as tf\n"
            "m = tf.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()\n"
            "assert tf.__version__ == '5.17.0', tf.__version__\n"
            "with torch.no_grad():\n"
            "    torch.save(m(input_ids=torch.load(sys.argv[2])).logits.float(), sys.argv[3])\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([str(LLMC_PYTHON), "-c", code, str(out), str(tmp_path / "ids.pt"), str(tmp_path / "l.pt")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    theirs = torch.load(tmp_path / "l.pt")
    assert ct.compare_logits(ours, theirs)["max_logit_diff"] <= ct.MAX_LOGIT_DIFF


def test_bundled_llm_reloads(llm_cache, tmp_path):
    """A small setting on the bundled SmolLM2 (tied embeddings: lm_head is not stored twice)."""
    settings = AnalysisSettings(model="smollm2", calibration=CalibrationSpec(n_samples=2, seqlen=64, heldout_samples=2),
                                sample_rows=64, heldout_rows=32,
                                sweep=SweepSettings(bits=(4,), group_size=64, n_grid=5))
    a = analyze(settings, llm_cache)
    out = tmp_path / "smol"
    s = ex.export(a, format=ct.FORMAT, out=out, method="rtn", spec=QuantSpec(4, 64, True), verify_tokens=128)
    assert s["verify"]["ok"] and s["quantized"] == 210 and s["groups"] == {"w4g64 asym": 210}
    from safetensors import safe_open

    with safe_open(str(out / ct.WEIGHTS_FILE), "pt") as f:
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()
    assert (out / "tokenizer.json").exists()


def test_cli_prints_the_reload_comparison(tiny_dir, tokenizer_dir, tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "core", "export", "--model", tiny_dir("llama"), "--tokenizer", tokenizer_dir,
           "--method", "rtn", "--bits", "4", "--group-size", "32", "--format", ct.FORMAT, "--out", str(out),
           "--cache-dir", str(tmp_path / "cache"), "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "config.json").exists() and "max |logit difference|" in r.stdout
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["verify"]["ok"] and summary["groups"] == {"w4g32 asym": 14}
