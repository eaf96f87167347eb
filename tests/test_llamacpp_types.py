"""llama.cpp's quant types (core.grids.llamacpp): byte for byte as gguf.quants and llama-quantize write them.

Real tensors: the bundled SmolLM2-135M GGUF's ``blk.0.ffn_down`` (rows 1536 wide) and ``blk.0.attn_q`` (576 wide),
dequantized and multiplied by a per-input-channel scale (as AWQ's scaled weights are) so that they no longer sit on
the file's own Q4_1 grid. The llama-quantize tests skip when the binary is not built (tools/build_llamacpp.sh).
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from core.grids import llamacpp as L

NAMES = ("blk.0.ffn_down.weight", "blk.0.attn_q.weight")


def _bundled_reader():
    gguf = pytest.importorskip("gguf")
    from core.model.gguf_file import GGUFError, bundled_gguf
    try:
        return gguf.GGUFReader(str(bundled_gguf()))
    except GGUFError as e:
        pytest.skip(str(e))


def _scaled(w: np.ndarray) -> np.ndarray:
    """``w * s`` with AWQ-like per-input-channel scales ``s = mean|w|^0.5`` normalised (deterministic)."""
    s = np.sqrt(np.abs(w).mean(axis=0) + 1e-6)
    s = s / np.sqrt(s.max() * s.min())
    return (w * s[None, :]).astype(np.float32)


@pytest.fixture(scope="module")
def weights() -> dict[str, np.ndarray]:
    """``{GGUF tensor name: float32 [rows, cols]}`` for ``NAMES`` (see the module docstring)."""
    r = _bundled_reader()
    out = {}
    for t in r.tensors:
        if t.name in NAMES:
            shape = (int(t.shape[1]), int(t.shape[0]))  # GGUF lists [in, out]
            out[t.name] = _scaled(L.dequantize(np.asarray(t.data), t.tensor_type.name, shape))
    assert set(out) == set(NAMES)
    return out


@pytest.fixture(scope="module")
def imatrix(weights) -> dict[str, np.ndarray]:
    """Importance weights per tensor ``[cols]``: positive, uneven (a stand-in for mean x^2)."""
    rng = np.random.default_rng(0)
    return {n: (rng.gamma(0.5, 1.0, w.shape[1]) + 1e-3).astype(np.float32) for n, w in weights.items()}


def test_layouts_match_ggml():
    import gguf
    assert L.TYPES == ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
    expect = {"Q4_0": 4.5, "Q4_1": 5.0, "Q5_0": 5.5, "Q5_1": 6.0, "Q8_0": 8.5, "Q2_K": 2.625, "Q3_K": 3.4375,
              "Q4_K": 4.5, "Q5_K": 5.5, "Q6_K": 6.5625}
    for t in L.TYPES:
        block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t]]
        assert (L.block_size(t), L.LAYOUTS[t].block_bytes) == (block, nbytes)
        assert L.LAYOUTS[t].ggml_id == int(gguf.GGMLQuantizationType[t])
        assert L.bits_per_weight(t) == expect[t]
    assert [L.nominal_bits(t) for t in L.TYPES] == [4, 4, 5, 5, 8, 2, 3, 4, 5, 6]
    assert L.check_type("q4_k") == "Q4_K"
    with pytest.raises(ValueError, match="unknown llama.cpp type 'Q4_X'"):
        L.check_type("Q4_X")


def test_fallback_table():
    assert L.fallback("Q4_K", 1536) == "Q4_K"
    assert [L.fallback(t, 576) for t in L.K_TYPES] == ["Q4_0", "Q4_0", "Q5_0", "Q5_1", "Q8_0"]
    assert L.fallback("Q4_0", 576) == "Q4_0"
    assert L.fallback("Q4_0", 100) == L.F16 and L.fallback("Q6_K", 48) == L.F16


@pytest.mark.parametrize("type", L.LEGACY_TYPES)
def test_legacy_types_c_equals_gguf(weights, type):
    """The copied C reference and gguf.quants (numpy) give the same bytes; dequantize inverts the layout."""
    for w in weights.values():
        q = L.quantize(w, type)
        assert q.dtype == np.uint8 and q.shape == (w.shape[0], L.row_bytes(type, w.shape[1]))
        assert np.array_equal(q, L.quantize_c(w, type))
        d = L.dequantize(q, type, w.shape)
        step = np.abs(w).max() / 2 ** (L.nominal_bits(type) - 1)
        assert np.abs(d - w).max() <= step


def test_error_falls_with_bits_and_imatrix_helps_where_it_weighs(weights, imatrix):
    w, q = weights["blk.0.ffn_down.weight"], imatrix["blk.0.ffn_down.weight"]
    errs = []
    for t in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"):
        plain = L.dequantize(L.quantize(w, t), t, w.shape)
        weighted = L.dequantize(L.quantize(w, t, q), t, w.shape)
        e_plain, e_weighted = (float((((d - w) ** 2) * q[None, :]).sum()) for d in (plain, weighted))
        assert e_weighted < e_plain, t  # the importance-weighted search lowers the error it weighs
        errs.append(float(((plain - w) ** 2).mean()))
    assert errs == sorted(errs, reverse=True)
    assert not np.array_equal(L.quantize(w, "Q4_0", q), L.quantize(w, "Q4_0"))


def test_fake_quantize_applies_the_fallback(weights):
    w = torch.from_numpy(weights["blk.0.attn_q.weight"])  # 576 wide: Q4_K -> Q5_0
    assert torch.equal(L.fake_quantize(w, "Q4_K"), L.fake_quantize(w, "Q5_0"))
    w16 = w[:, :48].contiguous()  # 48 wide: not even a block of 32 -> F16
    assert torch.equal(L.fake_quantize(w16, "Q4_0"), w16.half().float())
    with pytest.raises(ValueError, match="multiple of 256"):
        L.quantize(weights["blk.0.attn_q.weight"], "Q4_K")
    with pytest.raises(ValueError, match="NaN"):
        L.quantize(np.full((2, 32), np.nan, np.float32), "Q4_0")
    with pytest.raises(ValueError, match="input channels"):
        L.quantize(weights["blk.0.attn_q.weight"], "Q4_0", np.ones(5, np.float32))


# --- against llama-quantize itself --------------------------------------------------------------------------------

def _quantize_tool() -> Path:
    p = L.tool_path("llama-quantize")
    if p is None:
        pytest.skip("llama-quantize is not built (run tools/build_llamacpp.sh, or set AWQ_EXPLORER_LLAMACPP)")
    return p


def write_f32_gguf(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    """A GGUF llama-quantize accepts: the bundled file's scalar metadata (architecture, hyper-parameters) and
    ``tensors`` (``{name: float32 [rows, cols]}``) in F32. llama-quantize only needs the hyper-parameters."""
    import gguf
    r = _bundled_reader()
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(path), arch=arch)
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture" or f.types[0] == gguf.GGUFValueType.ARRAY:
            continue
        w.add_key_value(k, f.contents(), f.types[0])
    for name, a in tensors.items():
        w.add_tensor(name, np.ascontiguousarray(a, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def llama_quantize(src: Path, dst: Path, type: str, imatrix: Path | None = None) -> dict[str, tuple[str, np.ndarray]]:
    """Run ``llama-quantize --pure`` and read its tensors back: ``{name: (type, uint8 [rows, row bytes])}``."""
    import gguf
    cmd = [str(_quantize_tool()), "--pure", *(["--imatrix", str(imatrix)] if imatrix else []), str(src), str(dst),
           type, "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    out = {}
    for t in gguf.GGUFReader(str(dst)).tensors:
        rows = int(t.shape[1])
        out[t.name] = (t.tensor_type.name, np.asarray(t.data).reshape(rows, -1))
    return out


@pytest.fixture(scope="module")
def f32_gguf(weights, tmp_path_factory) -> Path:
    _quantize_tool()
    return write_f32_gguf(tmp_path_factory.mktemp("llamacpp") / "f32.gguf", weights)


@pytest.mark.parametrize("type", L.TYPES)
def test_bytes_equal_llama_quantize(weights, f32_gguf, tmp_path, type):
    """Every type (and llama-quantize's fallback for the 576-wide rows) equals llama-quantize's bytes."""
    got = llama_quantize(f32_gguf, tmp_path / "q.gguf", type)
    assert set(got) == set(NAMES)
    for name, (written, data) in got.items():
        w = weights[name]
        assert written == L.fallback(type, w.shape[1])
        assert np.array_equal(L.quantize(w, written), data), (name, written)


@pytest.mark.parametrize("type", L.TYPES)
def test_bytes_equal_llama_quantize_with_imatrix(weights, imatrix, f32_gguf, tmp_path, type):
    """With an imatrix written by core.model.imatrix, llama-quantize's bytes equal ours weighted by the same
    per-channel values llama-quantize reads from it (sum / count in float32)."""
    from core.model.imatrix import read_imatrix, write_imatrix
    counts = 1000
    path = write_imatrix(tmp_path / "imatrix.gguf", {n: (v * counts, counts) for n, v in imatrix.items()},
                         chunk_size=100, chunk_count=10)
    im = read_imatrix(path)
    got = llama_quantize(f32_gguf, tmp_path / "q.gguf", type, imatrix=path)
    for name, (written, data) in got.items():
        mine = L.quantize(weights[name], written, im.importance(name))
        assert np.array_equal(mine, data), (name, written)
        assert not np.array_equal(mine, L.quantize(weights[name], written)) or written == "Q8_0"


# --- routing: QuantSpec.format through the one door and the methods --------------------------------------------------

from core import methods as M  # noqa: E402
from core.grids.quant import fake_quant, pseudo_quantize  # noqa: E402
from core.grids.spec import QuantSpec  # noqa: E402
from core.methods import awq as awq_method  # noqa: E402
from core.methods.base import LayerInputs  # noqa: E402


def test_quantspec_takes_a_llamacpp_type():
    s = QuantSpec.of_type("q4_0")
    assert (s.bits, s.group_size, s.zero_point, s.format) == (4, 32, False, "Q4_0")
    assert s == QuantSpec(4, 32, False, "Q4_0") and s.key == "w4g32s:Q4_0" and s.cost(576) == 4.5
    k = QuantSpec.of_type("Q4_K")
    assert (k.zero_point, k.cost(1536), k.group(1536)) == (True, 4.5, 256)
    assert (k.stored_type(576), k.cost(576), k.group(576)) == ("Q5_0", 5.5, 32)  # llama-quantize's fallback
    assert k.with_bits(6) == QuantSpec.of_type("Q6_K") and QuantSpec.grid(5, 64, True, "Q4_1").format == "Q5_1"
    assert QuantSpec.grid(3, 64, True) == QuantSpec(3, 64, True)
    assert QuantSpec.of_type("Q8_0").cost(48) == 16.0  # no block fits: F16
    with pytest.raises(ValueError, match="blocks of 32"):
        QuantSpec(4, 64, False, "Q4_0")
    with pytest.raises(ValueError, match="unknown llama.cpp type"):
        QuantSpec(4, 32, False, "Q4_9")
    with pytest.raises(ValueError, match="no 3-bit type"):
        QuantSpec.of_type("Q4_0").with_bits(3)


def test_the_one_door(weights):
    w = torch.from_numpy(weights["blk.0.ffn_down.weight"])
    assert torch.equal(fake_quant(w, QuantSpec(4, 64)), pseudo_quantize(w, 4, 64))  # the integer grid unchanged
    assert torch.equal(fake_quant(w, QuantSpec.of_type("Q4_K")), L.fake_quantize(w, "Q4_K"))
    stacked = fake_quant(torch.stack([w, 2 * w]), QuantSpec.of_type("Q4_0"))  # a batch of scaled copies
    assert torch.equal(stacked[1], L.fake_quantize(2 * w, "Q4_0"))
    blocks = fake_quant(w.reshape(w.shape[0], -1, 32), QuantSpec.of_type("Q4_0"))  # per block, as the clip search
    assert torch.equal(blocks.reshape(w.shape), L.fake_quantize(w, "Q4_0"))
    q = torch.rand(w.shape[1])
    assert torch.equal(fake_quant(w, QuantSpec.of_type("Q4_0"), q), L.fake_quantize(w, "Q4_0", q))
    with pytest.raises(ValueError, match="llama.cpp types only"):
        fake_quant(w, QuantSpec(4, 64), q)


def _inputs(w: torch.Tensor, name: str) -> LayerInputs:
    """Inputs with AWQ's situation: a few channels far larger than the rest (heavy-tailed channel scales)."""
    g = torch.Generator().manual_seed(0)
    scale = torch.exp(torch.randn(w.shape[1], generator=g) * 1.2)
    x = torch.randn(256, w.shape[1], generator=g) * scale
    return LayerInputs(x_mean=x.abs().mean(0), x=x, name=name)


def test_layer_methods_on_llamacpp_types(weights):
    """rtn, awq and awq-clip run on a llama.cpp type through quantize_layer, with that type's quantizer; GPTQ and
    HQQ refuse it with one sentence."""
    w = torch.from_numpy(weights["blk.0.ffn_down.weight"])
    inputs = _inputs(w, "model.layers.0.mlp.down_proj")
    x = inputs.x
    err = lambda wh: float(((x @ (wh - w).T) ** 2).sum())  # noqa: E731
    for t in ("Q4_0", "Q4_K"):
        spec = QuantSpec.of_type(t)
        rtn = M.quantize_layer("rtn", w, inputs, spec)
        assert torch.equal(rtn, L.fake_quantize(w, t))
        awq = M.quantize_layer("awq", w, inputs, spec)
        s = awq_method.scales(w, inputs, spec, awq_method.AWQOptions())
        assert torch.equal(awq, L.fake_quantize(w * s.view(1, -1), t) / s.view(1, -1))
        clip = M.quantize_layer("awq-clip", w, inputs, spec)
        # the alpha grid starts at 0 (RTN), so AWQ never loses on its own sample; on Q4_0 it wins here, on Q4_K
        # (its own min/scale search per block of 32) the search may keep alpha 0
        assert err(awq) <= err(rtn) and err(clip) <= err(rtn), t
        if t == "Q4_0":
            assert err(awq) < err(rtn) and err(clip) < err(rtn)
    for m in ("gptq", "hqq"):
        with pytest.raises(ValueError, match=f"method '{m}' does not run on llama.cpp types such as Q4_0"):
            M.quantize_layer(m, w, LayerInputs(x=x, hessian=x.T @ x, name="x"), QuantSpec.of_type("Q4_0"))
    assert torch.equal(M.quantize_layer("rtn", w, inputs, QuantSpec(4, 64)), pseudo_quantize(w, 4, 64))


@pytest.fixture(scope="module")
def tiny_analysis(tiny_dir, tokenizer_dir, tmp_path_factory):
    from conftest import tiny_settings
    from core.analysis import analyze
    return analyze(tiny_settings(tiny_dir("llama"), tokenizer_dir), tmp_path_factory.mktemp("llamacpp-cache"))


def _context(a, fmt: str | None, bits: int, modes: tuple[str, ...]):
    from core.methods.base import ModelContext
    from core.model.blocks import snapshot
    from core.studies import evaluate
    lm = a.lm
    return ModelContext(a, lm, evaluate.eval_data(a, lm), snapshot(lm), ("fp", *modes), (bits,), 32, False,
                        10, 4096, evaluate.SEARCH_TOKENS, evaluate.CONST_ALPHA_TOKENS, format=fmt)


def test_model_methods_on_a_llamacpp_type(tiny_analysis):
    """The model halves of rtn, awq, awq-grouped and awq-clip on Q4_0 (tiny llama: rows 64 and 128 wide): their
    recipes quantize with llama.cpp's Q4_0, and the grouped search scored its alphas on it (its losses differ from
    the same search on the explorer's symmetric 4-bit grid with groups of 32)."""
    a = tiny_analysis
    modes = ("rtn", "awq", "awq-grouped", "awq-clip")
    ctx = _context(a, "Q4_0", 4, modes)
    spec = ctx.spec(4)
    assert spec == QuantSpec.of_type("Q4_0")
    res = M.METHODS["awq-grouped"].shared.run(ctx, lambda f, m: None)
    ctx.memo[M.METHODS["awq-grouped"].shared.name] = res
    names = [li.name for li in a.lm.linears]
    from core.methods.awq_search import apply_clip
    for mode in modes:
        recipe = M.METHODS[mode].model(ctx, spec, M.METHODS[mode].options(), lambda f, m: None)
        assert recipe.format == "Q4_0" and recipe.spec == spec
        for n in names:
            w0 = ctx.snap[f"{n}.weight"].float()
            pre = recipe.prequant(n, w0)
            if n in recipe.clip:
                pre = apply_clip(pre, recipe.clip[n])
            want = L.fake_quantize(pre, "Q4_0")
            if n in recipe.unscale:
                want = want / recipe.col[n].view(1, -1)
            assert torch.equal(recipe.final(n, w0), want), (mode, n)
    assert res.clips[4]  # awq-clip's clip search ran on the Q4_0 blocks
    int_ctx = _context(a, None, 4, ("awq-grouped",))
    int_res = M.METHODS["awq-grouped"].shared.run(int_ctx, lambda f, m: None)
    diff = [not torch.equal(s.losses, t.losses) for s, t in zip(res.searches[4], int_res.searches[4])]
    assert any(diff)
    with pytest.raises(ValueError, match="does not run on llama.cpp types"):
        M.METHODS["gptq"].model(ctx, spec, M.METHODS["gptq"].options(), lambda f, m: None)


def test_the_bundled_file_is_reproduced_byte_for_byte():
    """Every Q4_1 tensor of the bundled GGUF (210 linears), read back and quantized again in Q4_1, gives the file's
    own bytes: the round trip is exact on real llama-quantize output. (So on this model Q4_1 RTN is lossless: its
    weights already lie on that grid.)"""
    r = _bundled_reader()
    tensors = [t for t in r.tensors if t.tensor_type.name == "Q4_1"]
    assert len(tensors) == 210
    for t in tensors:
        shape = (int(t.shape[1]), int(t.shape[0]))
        data = np.asarray(t.data).reshape(shape[0], -1)
        assert np.array_equal(L.quantize(L.dequantize(data, "Q4_1", shape), "Q4_1"), data), t.name
